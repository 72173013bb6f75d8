import pytest
import torch

import attnseg
import attnseg.convert as convert
from attnseg.backbones.transnext import TransNeXt
from attnseg.convert import transnext as conv
from attnseg.errors import CheckpointError
from tests.conftest import load_fixture

CLS = "transnext_cls_tiny_cfg.pt"
DENSE = "transnext_dense_tiny_cfg.pt"
_ARCH = ("img_size", "pretrain_size", "embed_dims", "num_heads", "mlp_ratios", "depths", "sr_ratios")


def _arch(fx):
    return {k: v for k, v in fx["constructor"]["kwargs"].items() if k in _ARCH}


def test_family_is_discovered():
    assert "transnext" in convert.families()
    assert convert.get_converter("transnext") is conv


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd},
    lambda sd: {"state_dict": sd},
    lambda sd: {"state_dict_ema": sd, "epoch": 3},
    lambda sd: {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()},
                               "decode_head.conv_seg.weight": torch.zeros(2, 4, 1, 1)}, "meta": {}},
])
def test_every_published_layout_gives_the_same_keys(wrap):
    sd = load_fixture(DENSE)["state_dict"]
    out = conv.convert_state_dict(wrap(sd))
    assert list(out) == list(sd) and all(out[k] is sd[k] for k in sd)


def test_mm_style_dense_checkpoint_reproduces_the_official_maps():
    fx = load_fixture(DENSE)
    ckpt = {"meta": {"mmseg_version": "0.30.0"}, "state_dict": {
        **{f"backbone.{k}": v for k, v in fx["state_dict"].items()},
        "decode_head.conv_seg.weight": torch.zeros(150, 512, 1, 1), "auxiliary_head.conv_seg.bias": torch.zeros(150)}}
    model = convert.from_official("transnext", fx["constructor"], ckpt)
    with torch.no_grad():
        for ours, ref in zip(model(fx["input"]), fx["output"]):
            assert torch.allclose(ours, ref, **fx["tolerance"])


def test_stale_buffers_are_dropped_and_unknown_keys_refused():
    sd = load_fixture(CLS)["state_dict"]
    with_buffers = {**sd, "relative_pos_index1": torch.zeros(3, dtype=torch.long),
                    "block1.0.attn.padding_mask": torch.zeros(2, dtype=torch.bool)}
    assert conv.is_official(with_buffers) and not conv.is_official(sd)
    assert list(conv.convert_state_dict(with_buffers)) == list(sd)
    with pytest.raises(CheckpointError, match=r"1 key\(s\) of a TransNeXt state_dict have no place .*: block1.0.ls"):
        conv.convert_state_dict({**sd, "block1.0.ls.gamma": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not a TransNeXt state_dict"):
        conv.convert_state_dict({"stem.conv1.weight": torch.zeros(1)})


def test_load_pretrained_reads_classification_and_dense_files(tmp_path):
    cls, dense = load_fixture(CLS), load_fixture(DENSE)
    path = tmp_path / "transnext_cls.pth"
    torch.save({"model": cls["state_dict"]}, path)
    model = TransNeXt(num_classes=10, **_arch(cls)).eval()
    report = attnseg.load_pretrained(model, path)
    assert not (report.missing or report.unexpected or report.dropped)
    with torch.no_grad():
        assert torch.allclose(model(cls["input"]), cls["output"], **cls["tolerance"])
    backbone = TransNeXt(num_classes=0, **_arch(cls))  # a classification file into a dense backbone: head dropped
    assert attnseg.load_pretrained(backbone, path).dropped == ["head.weight", "head.bias"]

    path = tmp_path / "upernet_transnext.pth"
    torch.save({"state_dict": {**{f"backbone.{k}": v for k, v in dense["state_dict"].items()},
                               "decode_head.conv_seg.weight": torch.zeros(2, 4, 1, 1)}}, path)
    model = TransNeXt(num_classes=0, **_arch(dense)).eval()
    report = attnseg.load_pretrained(model, path)
    assert not (report.missing or report.unexpected) and report.ignored == ["decode_head.conv_seg.weight"]
    with torch.no_grad():
        for ours, ref in zip(model.forward_pyramid(dense["input"]), dense["output"]):
            assert torch.allclose(ours, ref, **dense["tolerance"])


def test_factory_constructor_records():
    fx = load_fixture(CLS)
    kwargs = {k: v for k, v in fx["constructor"]["kwargs"].items()
              if k in ("img_size", "pretrain_size", "embed_dims", "num_heads", "depths", "num_classes")}
    model = convert.from_official("transnext", {"name": "transnext_tiny", "kwargs": {**kwargs, "pretrained": False}},
                                  fx["state_dict"])
    with torch.no_grad():
        assert torch.allclose(model(fx["input"]), fx["output"], **fx["tolerance"])


def test_from_official_refuses_what_it_cannot_build():
    fx = load_fixture(CLS)
    kwargs = fx["constructor"]["kwargs"]
    with pytest.raises(ValueError, match=r"unknown official TransNeXt constructor 'TransNext'; did you mean"):
        conv.from_official({"name": "TransNext", "kwargs": kwargs}, fx["state_dict"])
    with pytest.raises(ValueError, match="norm_layer"):
        conv.from_official({"name": "TransNeXt", "kwargs": {**kwargs, "norm_layer": {"type": "LayerNorm"}}},
                           fx["state_dict"])
    with pytest.raises(ValueError, match="patch_size"):
        conv.from_official({"name": "TransNeXt", "kwargs": {**kwargs, "patch_size": 16}}, fx["state_dict"])
    with pytest.raises(ValueError, match=r"arguments \['mystery'\] are not supported"):
        conv.from_official({"name": "TransNeXt", "kwargs": {**kwargs, "mystery": 1}}, fx["state_dict"])
    with pytest.raises(CheckpointError, match="missing"):
        conv.from_official(fx["constructor"], {k: v for k, v in fx["state_dict"].items() if k != "norm4.weight"})
