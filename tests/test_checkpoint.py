import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from attnseg.checkpoint import load_pretrained, read_state_dict, save_atomic
from attnseg.errors import CheckpointError
from attnseg.registry import BACKBONES


def _model(**kw):
    return BACKBONES.get("test_mambaout")(**kw)


def _same(a, b):
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "state_dict_ema", "backbone_prefix", "lightning"])
def test_formats_round_trip(tmp_path, wrap):
    src, dst = _model(num_classes=4), _model(num_classes=4)
    sd = src.state_dict()
    obj = {
        "plain": sd,
        "model": {"model": sd, "epoch": 3},
        "state_dict": {"state_dict": sd},
        "state_dict_ema": {"state_dict_ema": sd, "other": 1},
        "backbone_prefix": {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()},
                                           "decode_head.conv.weight": torch.zeros(2)}},
        "lightning": {"state_dict": {f"model.backbone.{k}": v for k, v in sd.items()}, "global_step": 5},
    }[wrap]
    torch.save(obj, tmp_path / "c.pth")
    report = load_pretrained(dst, tmp_path / "c.pth")
    assert _same(src, dst)
    assert not report.missing and not report.unexpected


def test_safetensors(tmp_path):
    src, dst = _model(), _model()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    load_pretrained(dst, tmp_path / "w.safetensors")
    assert _same(src, dst)


def test_official_layout_is_converted(tmp_path):
    # Rename our keys to the official layout by hand, then load through the family converter.
    src = _model(num_classes=4, pyramid_norm=False)
    official = {}
    for k, v in src.state_dict().items():
        if k.startswith("stem."):
            nk = "downsample_layers.0." + k[5:]
        elif ".downsample." in k:
            i = k.split(".")[1]
            nk = f"downsample_layers.{i}." + k.split(".downsample.")[1]
        elif ".blocks." in k:
            parts = k.split(".")
            nk = ".".join(["stages", parts[1], parts[3], *parts[4:]])
        elif k.startswith("head.pre_logits.fc."):
            nk = "head.fc1." + k.split(".")[-1]
        elif k.startswith("head.pre_logits.norm."):
            nk = "head.norm." + k.split(".")[-1]
        elif k.startswith("head.fc."):
            nk = "head.fc2." + k.split(".")[-1]
        else:
            nk = "norm." + k.split(".")[-1]
        official[nk] = v
    torch.save(official, tmp_path / "official.pth")
    dst = _model(num_classes=4, pyramid_norm=False)
    load_pretrained(dst, tmp_path / "official.pth")
    assert _same(src, dst)


def test_classifier_of_another_size_is_dropped_and_reported(tmp_path):
    torch.save(_model(num_classes=10).state_dict(), tmp_path / "c.pth")
    report = load_pretrained(_model(num_classes=3), tmp_path / "c.pth")
    assert sorted(report.dropped) == ["head.fc.bias", "head.fc.weight"]


def test_checkpoint_of_another_model_names_the_mismatch(tmp_path):
    other = BACKBONES.get("mambaout_femto")(num_classes=4)
    torch.save(other.state_dict(), tmp_path / "femto.pth")
    with pytest.raises(CheckpointError, match=r"femto.pth does not fit MambaOut .*stem.conv1.weight: \[24, 3, 3, 3\] "
                                              r"vs \[8, 3, 3, 3\]"):
        load_pretrained(_model(num_classes=4), tmp_path / "femto.pth")
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="only 0 of the model's .* keys are in the checkpoint"):
        load_pretrained(_model(), tmp_path / "foreign.pth")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_state_dict(tmp_path / "junk.pth")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": {"w": _Exploit(str(marker))}}, f)
    torch.save({"w": torch.zeros(1), "payload": _Exploit(str(marker))}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError, match=f"refused to load .*{name}.*code execution"):
            load_pretrained(_model(), tmp_path / name)
    assert not marker.exists()


def test_save_atomic_leaves_no_temporary(tmp_path):
    save_atomic({"a": torch.ones(2)}, tmp_path / "x" / "w.pth")
    assert torch.load(tmp_path / "x" / "w.pth", weights_only=True)["a"].sum() == 2
    assert os.listdir(tmp_path / "x") == ["w.pth"]
