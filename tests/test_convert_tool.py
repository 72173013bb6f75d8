"""attnseg-convert (tools/convert.py): official checkpoints and training checkpoints -> model.safetensors +
config.json, with the load report printed and unsafe files refused."""

import json
import pickle

import pytest
import torch

import attnseg.convert as convert
from attnseg.checkpoint import load_pretrained
from attnseg.cli import convert as tool
from attnseg.convert.mambaout import to_official
from attnseg.model_files import CONFIG_NAME, WEIGHTS_NAME, load_model, read_model_info
from attnseg.models.builder import build_model
from tests.conftest import load_fixture


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_list_names_every_converter_family(capsys):
    assert tool.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == convert.families()
    assert any(line.startswith("mambaout") and "MambaOut" in line for line in lines)


def test_official_parity_fixture_converts_to_the_directly_converted_model(tmp_path, capsys):
    fx = load_fixture("mambaout_tiny_cfg.pt")
    torch.save({"model": fx["state_dict"]}, tmp_path / "official.pth")
    kwargs = {k: v for k, v in fx["constructor"]["kwargs"].items() if k != "num_classes"}
    argv = [str(tmp_path / "official.pth"), "--model", "mambaout_tiny", "--kwargs", json.dumps(kwargs),
            "--num-classes", str(fx["constructor"]["kwargs"]["num_classes"]), "--out", str(tmp_path / "out")]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "official layout of mambaout" in printed
    assert "loaded into Classifier: converted from the mambaout layout; initialized (8): " in printed
    model, info = load_model(tmp_path / "out")
    direct = convert.from_official("mambaout", fx["constructor"], fx["state_dict"])
    with torch.no_grad():
        ours = model(fx["input"])
        assert torch.equal(ours, direct(fx["input"]))
    torch.testing.assert_close(ours, fx["output"], **fx["tolerance"])
    assert info.task == "classification" and info.model["backbone"]["name"] == "mambaout_tiny"
    assert info.model["backbone"]["dims"] == [16, 32, 48, 64] and info.source == "official.pth"


def test_synthesized_official_file_round_trips_through_the_tool(tmp_path, capsys):
    # an official-layout state dict made from a random attnseg model (runs without the parity fixtures)
    src = _perturbed(build_model({"backbone": {"name": "test_mambaout", "pyramid_norm": False}, "num_classes": 4},
                                 task="classification"))
    torch.save(to_official(src.backbone.state_dict()), tmp_path / "official.pth")
    assert tool.main([str(tmp_path / "official.pth"), "--model", "test_mambaout", "--num-classes", "4",
                      "--family", "mambaout", "--out", str(tmp_path / "out")]) == 0
    assert "converted from the mambaout layout" in capsys.readouterr().out
    model, _ = load_model(tmp_path / "out")
    direct = build_model({"backbone": {"name": "test_mambaout"}, "num_classes": 4}, task="classification").eval()
    load_pretrained(direct, tmp_path / "official.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), direct(x))
    # config.json is JSON; the weights are safetensors with the model's keys
    doc = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert doc["task"] == "classification" and doc["model"]["num_classes"] == 4
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / WEIGHTS_NAME), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())


def test_backbone_file_into_a_config_segmentor_reports_the_decoder(tmp_path, capsys):
    import yaml

    seg = {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr", "feature_size": 8}, "num_classes": 3}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": seg, "data": {"dataset": {"name": "synthetic2d", "num_classes": 3}}}))
    src = _perturbed(build_model({"backbone": {"name": "test_mambaout", "pyramid_norm": False}, "num_classes": 10},
                                 task="classification"))
    torch.save({"model": to_official(src.backbone.state_dict())}, tmp_path / "backbone.pth")
    argv = [str(tmp_path / "backbone.pth"), "--config", str(cfg), "--out", str(tmp_path / "out")]
    err = _expect_error(capsys, argv)  # strict: the decoder is not in a backbone checkpoint
    assert "does not match Segmentor: converted from the mambaout layout; missing (" in err
    assert tool.main([*argv, "--no-strict"]) == 0
    printed = capsys.readouterr().out
    assert "loaded into Segmentor: converted from the mambaout layout; missing (" in printed and "head." in printed
    model, info = load_model(tmp_path / "out")
    assert torch.equal(model.backbone.stem.conv1.weight, src.backbone.stem.conv1.weight)
    assert info.task == "segmentation" and info.experiment["model"]["head"]["name"] == "unetr"


def test_training_checkpoint_is_exported(tmp_path, capsys):
    from attnseg.config import ExperimentConfig

    cfg = ExperimentConfig.model_validate({"model": {"backbone": {"name": "test_mambaout"}, "num_classes": 5},
                                           "task": "classification",
                                           "data": {"dataset": {"name": "synthetic2d", "num_classes": 5}}})
    model = _perturbed(build_model(cfg))
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": cfg.model_dump(mode="json")}}, tmp_path / "last.ckpt")
    assert tool.main([str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "out")]) == 0
    assert "from the training checkpoint" in capsys.readouterr().out
    loaded, info = load_model(tmp_path / "out")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert read_model_info(tmp_path / "out").task == "classification" == info.task


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def _expect_error(capsys, argv):
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unsafe_and_bad_inputs_are_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": {"w": _Payload(str(marker))}}, f)
    err = _expect_error(capsys, [str(tmp_path / "evil.pth"), "--model", "test_mambaout", "--num-classes", "2",
                                 "--out", str(tmp_path / "o")])
    assert "refused to load" in err and "need code execution to unpickle are refused" in err
    assert not marker.exists() and not (tmp_path / "o").exists()
    torch.save(_perturbed(build_model({"backbone": {"name": "test_mambaout"}, "num_classes": 2},
                                      task="classification")).state_dict(), tmp_path / "ok.pth")
    assert "--num-classes is needed: test_mambaout has no published class count" in _expect_error(
        capsys, [str(tmp_path / "ok.pth"), "--model", "test_mambaout", "--out", str(tmp_path / "o")])
    assert "--kwargs is not JSON" in _expect_error(
        capsys, [str(tmp_path / "ok.pth"), "--model", "test_mambaout", "--num-classes", "2", "--kwargs", "{dims",
                 "--out", str(tmp_path / "o")])
    assert "--family natt: no such converter" in _expect_error(
        capsys, [str(tmp_path / "ok.pth"), "--model", "test_mambaout", "--num-classes", "2", "--family", "natt",
                 "--out", str(tmp_path / "o")])
    assert "records no attnseg config" in _expect_error(capsys, [str(tmp_path / "ok.pth"), "--out",
                                                                 str(tmp_path / "o")])
    assert "give a checkpoint and --out" in _expect_error(capsys, [str(tmp_path / "ok.pth")])


def test_whole_published_model_through_a_config(tmp_path, capsys):
    """An official DconnNet file (the whole model) into the Segmentor a config describes: the head's converter
    recognises it; the written model predicts what the directly loaded one does."""
    from attnseg.config import load_config

    fx = load_fixture("dconnnet_model.pt")
    torch.save({k: v.contiguous() for k, v in fx["state_dict"].items()}, tmp_path / "dconnnet.pth")
    cfg = "configs/connectivity/dconnnet_resnet34_isic_binary.yaml"
    assert tool.main([str(tmp_path / "dconnnet.pth"), "--config", cfg, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "official layout of dconnnet" in printed and "converted from the dconnnet layout" in printed
    model, info = load_model(tmp_path / "out")
    direct = build_model(load_config(cfg, [f"model.checkpoint={tmp_path / 'dconnnet.pth'}"])).eval()
    x = fx["input"].float()
    with torch.no_grad():
        ours = model(x)
        assert torch.equal(ours, direct(x))
    torch.testing.assert_close(ours, fx["output"]["logits"], atol=fx["tolerance"]["atol"],
                               rtol=fx["tolerance"]["rtol"])
    assert info.task == "segmentation" and info.model["checkpoint"] is None
