"""Checkpoint security (issue 11): a malicious pickle, whose unpickling would run code (here: create a marker
file), is refused with a message naming the file at every place attnseg reads a checkpoint, and its code never
runs: the marker never appears."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from attnseg.checkpoint import load_pretrained, read_state_dict, safe_torch_load
from attnseg.cli import convert, infer, train
from attnseg.cli import test as evaluate
from attnseg.errors import CheckpointError
from attnseg.registry import BACKBONES
from tests.test_tools import tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


class _Payload:
    """Unpickling calls ``open(marker, "w")``: the marker file is the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def evil(tmp_path):
    """``(files, marker)``: a plain pickle and a torch.save archive, both carrying the payload, named .ckpt/.pth."""
    marker = tmp_path / "pwned"
    files = {}
    with open(tmp_path / "evil_pickle.pth", "wb") as f:
        pickle.dump({"state_dict": {"w": _Payload(str(marker))}}, f)
    files["pickle"] = tmp_path / "evil_pickle.pth"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "payload": _Payload(str(marker)), "global_step": 1,
                "epoch": 0}, tmp_path / "evil_archive.ckpt")
    files["archive"] = tmp_path / "evil_archive.ckpt"
    assert not marker.exists()
    return files, marker


REFUSED = r"refused to load .*evil_\w+\.\w+: the safe \(weights_only=True\) unpickler cannot read it"


def test_library_loaders_refuse_it(evil):
    files, marker = evil
    model = BACKBONES.get("test_mambaout")(num_classes=0)
    for path in files.values():
        for load in (lambda p: load_pretrained(model, p), read_state_dict, safe_torch_load):
            with pytest.raises(CheckpointError, match=REFUSED):
                load(path)
    assert not marker.exists()


def test_command_line_tools_refuse_it(evil, tmp_path, capsys):
    files, marker = evil
    cfg = tiny_cfg(tmp_path)
    (tmp_path / "img.png").write_bytes(b"")  # never read: the checkpoint is refused first
    for path in files.values():
        for main, argv in (
            (infer.main, ["--config", str(cfg), "--checkpoint", str(path), str(tmp_path / "img.png"),
                          "--out", str(tmp_path / "out")]),
            (evaluate.main, [str(cfg), "--checkpoint", str(path)]),
            (convert.main, [str(path), "--model", "test_mambaout", "--num-classes", "2", "--out",
                            str(tmp_path / "converted")]),
        ):
            assert main(argv) == 2
            err = capsys.readouterr().err
            error = err[err.index("error: "):]
            assert "refused to load" in error and path.name in error and "Traceback" not in error
    assert not marker.exists()


def test_resume_refuses_a_malicious_last_checkpoint(evil, tmp_path, capsys):
    files, marker = evil
    cfg = tiny_cfg(tmp_path)
    (tmp_path / "work" / "checkpoints").mkdir(parents=True)
    shutil.copy(files["archive"], tmp_path / "work" / "checkpoints" / "last.ckpt")
    assert train.main([str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "last.ckpt" in err and "Traceback" not in err
    assert not marker.exists()


def test_pretrained_backbone_in_a_config_and_through_timm_refuse_it(evil, tmp_path, capsys):
    import timm

    import attnseg  # noqa: F401 - registers the attnseg_ timm models

    files, marker = evil
    cfg = tiny_cfg(tmp_path)
    assert train.main([str(cfg), "--set", f"model.backbone.pretrained={files['pickle']}"]) == 2
    assert "refused to load" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=REFUSED):
        timm.create_model("attnseg_mambaout_femto", pretrained=True, pretrained_cfg_overlay={"file": str(files["pickle"])})
    assert not marker.exists()
