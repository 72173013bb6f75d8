import logging
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from attnseg.checkpoint import LoadReport, load_pretrained, read_state_dict, save_state_dict_atomic
from attnseg.convert.mambaout import to_official
from attnseg.errors import CheckpointError
from attnseg.registry import BACKBONES


def _model(**kw):
    return BACKBONES.get("test_mambaout")(**kw)


def _same(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


class _Seg(nn.Module):
    """Stands in for attnseg's Segmentor: ``backbone.*`` + ``head.*`` keys and a ``num_classes``."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.backbone = _model(num_classes=0)
        self.head = nn.Conv2d(48, num_classes, 1)
        self.num_classes = num_classes


# -- formats ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "state_dict_ema", "nested", "ddp",
                                  "backbone_prefix", "lightning_backbone", "segmentor_keys"])
def test_formats_round_trip(tmp_path, wrap):
    src, dst = _perturbed(_model(num_classes=4)), _model(num_classes=4)
    sd = src.state_dict()
    obj = {
        "plain": sd,
        "model": {"model": sd, "epoch": 3},
        "state_dict": {"state_dict": sd},
        "state_dict_ema": {"state_dict": {k: torch.zeros_like(v) for k, v in sd.items()}, "state_dict_ema": sd},
        "nested": {"state_dict": {"model": sd}},
        "ddp": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "backbone_prefix": {"meta": {"iter": 1}, "state_dict": {
            **{f"backbone.{k}": v for k, v in sd.items()}, "decode_head.conv_seg.weight": torch.zeros(2)}},
        "lightning_backbone": {"state_dict": {f"model.backbone.{k}": v for k, v in sd.items()}, "global_step": 5,
                               "optimizer_states": [{}], "hyper_parameters": {"lr": 0.1}},
        "segmentor_keys": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.out.weight": torch.zeros(3, 2)},
    }[wrap]
    path = tmp_path / ("c.ckpt" if wrap.startswith("lightning") else "c.pth")
    torch.save(obj, path)
    report = load_pretrained(dst, path)
    assert _same(src, dst)
    assert not report.missing and not report.unexpected and not report.dropped and report.converted is None
    if wrap in ("backbone_prefix", "segmentor_keys"):
        assert report.ignored == (["decode_head.conv_seg.weight"] if wrap == "backbone_prefix" else ["head.out.weight"])


@pytest.mark.parametrize("numpy_module", ["numpy._core", "numpy.core"])
def test_att_swin_unet_trainer_file_with_a_numpy_metric(tmp_path, numpy_module):
    # NITR098/AttSwinUNet saves {'model_weights': sd, 'test_F1_score': sklearn's np.float64}; NumPy 1 pickles name
    # numpy.core.multiarray.scalar, NumPy 2 pickles numpy._core.multiarray.scalar
    import zipfile

    import numpy as np

    src, dst = _perturbed(_model(num_classes=4)), _model(num_classes=4)
    torch.save({"model_weights": src.state_dict(), "test_F1_score": np.float64(0.9173), "epoch": np.int64(15)},
               tmp_path / "raw.model")
    with zipfile.ZipFile(tmp_path / "raw.model") as zin, zipfile.ZipFile(tmp_path / "w.model", "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", numpy_module.encode() + b".multiarray")
            zout.writestr(item, data)
    report = load_pretrained(dst, tmp_path / "w.model")
    assert _same(src, dst) and not report.missing and not report.unexpected


def test_lightning_checkpoint_into_a_segmentor(tmp_path):
    src, dst = _perturbed(_Seg()), _Seg()
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}, "epoch": 2}, tmp_path / "l.ckpt")
    report = load_pretrained(dst, tmp_path / "l.ckpt")
    assert _same(src, dst) and str(report) == "all keys matched"


def test_safetensors(tmp_path):
    src, dst = _perturbed(_model()), _model()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    load_pretrained(dst, tmp_path / "w.safetensors")
    assert _same(src, dst)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*bad.safetensors"):
        load_pretrained(dst, tmp_path / "bad.safetensors")


# -- converters, new keys, heads --------------------------------------------------------------------------------

def test_official_layout_is_converted_and_pyramid_norms_stay_initialised(tmp_path):
    src = _perturbed(_model(num_classes=4, pyramid_norm=False))
    torch.save(to_official(src.state_dict()), tmp_path / "official.pth")
    dst = _model(num_classes=4)  # with pyramid norms: new parameters, absent from official weights
    norms_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("pyramid_norms")}
    report = load_pretrained(dst, tmp_path / "official.pth")
    assert report.converted == "mambaout"
    assert sorted(report.initialized) == sorted(norms_before) and len(norms_before) == 8
    assert not report.missing and not report.unexpected
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items()
               if not k.startswith("pyramid_norms"))
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in norms_before.items())


def test_official_backbone_checkpoint_into_a_segmentor(tmp_path):
    src = _perturbed(_model(num_classes=1000, pyramid_norm=False))
    torch.save({"model": to_official(src.state_dict())}, tmp_path / "mambaout.pth")
    seg = _Seg()
    report = load_pretrained(seg, tmp_path / "mambaout.pth", strict=False)
    assert report.converted == "mambaout"
    assert sorted(report.dropped)[:2] == ["backbone.head.fc.bias", "backbone.head.fc.weight"]  # headless backbone
    assert len(report.dropped) == 8 and not report.unexpected  # head.norm, pre_logits.{fc,norm}, fc
    assert sorted(report.missing) == ["head.bias", "head.weight"]  # the decoder is not in a backbone checkpoint
    assert torch.equal(seg.backbone.stem.conv1.weight, src.stem.conv1.weight)
    with pytest.raises(CheckpointError, match=r"missing \(2\): head.weight, head.bias"):
        load_pretrained(_Seg(), tmp_path / "mambaout.pth")


def test_classification_checkpoint_into_a_headless_backbone(tmp_path):
    torch.save(_model(num_classes=10).state_dict(), tmp_path / "c.pth")
    report = load_pretrained(_model(num_classes=0), tmp_path / "c.pth")
    assert sorted(report.dropped) == sorted(k for k in _model(num_classes=10).state_dict() if k.startswith("head."))


def test_classifier_of_another_size_is_dropped_and_reported(tmp_path):
    src = _perturbed(_model(num_classes=10))
    torch.save(src.state_dict(), tmp_path / "c.pth")
    dst = _model(num_classes=3)
    report = load_pretrained(dst, tmp_path / "c.pth")
    assert sorted(report.dropped) == ["head.fc.bias", "head.fc.weight"]
    assert not report.missing and not report.mismatched
    assert torch.equal(dst.head.pre_logits.fc.weight, src.head.pre_logits.fc.weight)
    assert dst.head.fc.weight.shape == (3, 4 * 48)


def test_segmentation_head_of_another_class_count_is_dropped(tmp_path):
    src = _perturbed(_Seg(num_classes=5))
    torch.save(src.state_dict(), tmp_path / "seg.pth")
    dst = _Seg(num_classes=2)
    report = load_pretrained(dst, tmp_path / "seg.pth")
    assert sorted(report.dropped) == ["head.bias", "head.weight"]
    assert torch.equal(dst.backbone.stem.conv1.weight, src.backbone.stem.conv1.weight)


# -- refusals -----------------------------------------------------------------------------------------------------

def test_checkpoint_of_another_model_names_the_mismatch(tmp_path):
    torch.save(BACKBONES.get("mambaout_femto")(num_classes=4).state_dict(), tmp_path / "femto.pth")
    with pytest.raises(CheckpointError, match=r"femto.pth does not fit MambaOut .*shape mismatches .*"
                                              r"stem.conv1.weight: \[24, 3, 3, 3\] vs \[8, 3, 3, 3\].*more\)"):
        load_pretrained(_model(num_classes=4), tmp_path / "femto.pth", strict=False)
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match=r"only 0 of the \d+ expected keys are in the checkpoint; "
                                              r"missing: stem.conv1.weight.*unexpected: encoder.weight"):
        load_pretrained(_model(), tmp_path / "foreign.pth", strict=False)


def test_strict_and_non_strict_missing_and_unexpected(tmp_path, caplog):
    sd = _model(num_classes=4).state_dict()
    sd.pop("stages.3.blocks.0.fc2.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"c.pth does not match MambaOut: missing \(1\): "
                                              r"stages.3.blocks.0.fc2.bias; unexpected \(1\): extra.weight"):
        load_pretrained(_model(num_classes=4), tmp_path / "c.pth")
    with caplog.at_level(logging.INFO, logger="attnseg.checkpoint"):
        report = load_pretrained(_model(num_classes=4), tmp_path / "c.pth", strict=False)
        assert isinstance(report, LoadReport)
        assert report.missing == ["stages.3.blocks.0.fc2.bias"] and report.unexpected == ["extra.weight"]
        # the report is logged: a warning when keys are missing or unexpected, else info
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
            (logging.WARNING, f"loaded {tmp_path / 'c.pth'} into MambaOut: {report}")]
        caplog.clear()
        torch.save(_model(num_classes=4).state_dict(), tmp_path / "d.pth")
        load_pretrained(_model(num_classes=4), tmp_path / "d.pth")
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
            (logging.INFO, f"loaded {tmp_path / 'd.pth'} into MambaOut: all keys matched")]


def test_official_checkpoint_with_an_unplaceable_key(tmp_path):
    sd = to_official(_model(num_classes=4, pyramid_norm=False).state_dict())
    torch.save({**sd, "dist_head.weight": torch.zeros(2)}, tmp_path / "o.pth")
    with pytest.raises(CheckpointError, match="no place in attnseg's layout: dist_head.weight"):
        load_pretrained(_model(num_classes=4), tmp_path / "o.pth")


def test_explicit_family_without_converter(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match="no converter for family 'natt'"):
        load_pretrained(_model(), tmp_path / "c.pth", family="natt")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        load_pretrained(_model(), tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*junk.pth: not a PyTorch file"):
        read_state_dict(tmp_path / "junk.pth")
    torch.save(_model().state_dict(), tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*cut.pth"):
        read_state_dict(tmp_path / "cut.pth")
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match=r"meta.pth does not contain a state_dict \(top-level keys: epoch, config"):
        read_state_dict(tmp_path / "meta.pth")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": {"w": _Exploit(str(marker))}}, f)
    torch.save({"w": torch.zeros(1), "payload": _Exploit(str(marker))}, tmp_path / "evil2.pth")
    assert not marker.exists()
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError, match=f"refused to load .*{name}: .*need code execution to unpickle are refused"):
            load_pretrained(_model(), tmp_path / name)
    assert not marker.exists()


# -- atomic save ----------------------------------------------------------------------------------------------------

def test_save_state_dict_atomic_leaves_no_temporary(tmp_path):
    save_state_dict_atomic({"a": torch.ones(2)}, tmp_path / "x" / "w.pth")
    save_state_dict_atomic({"a": torch.full((2,), 2.0)}, tmp_path / "x" / "w.pth")  # replaces
    assert torch.load(tmp_path / "x" / "w.pth", weights_only=True)["a"].sum() == 4
    assert os.listdir(tmp_path / "x") == ["w.pth"]


def test_failed_save_keeps_the_old_file_and_no_temporary(tmp_path):
    save_state_dict_atomic({"a": torch.ones(2)}, tmp_path / "w.pth")
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        save_state_dict_atomic({"a": lambda: 0}, tmp_path / "w.pth")
    assert os.listdir(tmp_path) == ["w.pth"]
    assert torch.load(tmp_path / "w.pth", weights_only=True)["a"].sum() == 2


class _Config:
    """A plain custom class an official trainer pickles beside its weights (e.g. an argparse-like namespace)."""

    def __init__(self, marker):
        self.marker = marker

    def __setstate__(self, state):
        open(state["marker"], "w").close()  # would run when unpickled with weights_only=False
        self.__dict__.update(state)


def test_objects_of_custom_classes_are_refused_naming_the_class(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": _model().state_dict(), "args": _Config(str(marker))}, tmp_path / "args.pth")
    torch.save(_model(), tmp_path / "whole_module.pth")  # torch.save(model): the module object itself
    for name, cls in (("args.pth", "_Config"), ("whole_module.pth", "MambaOut")):
        with pytest.raises(CheckpointError, match=rf"refused to load .*{name}: the safe \(weights_only=True\) "
                                                  rf"unpickler cannot read it \(.*{cls}.*\)\. Files whose objects "
                                                  r"need code execution to unpickle are refused; re-save the "
                                                  r"state_dict"):
            load_pretrained(_model(), tmp_path / name)
    assert not marker.exists()
