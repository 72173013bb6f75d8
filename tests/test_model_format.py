"""attnseg's own model format (model.safetensors + config.json): save/load round trips, refusals, export from a
training checkpoint, and the trainer and attnseg-infer using it."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from attnseg.checkpoint import load_pretrained
from attnseg.config import ExperimentConfig
from attnseg.errors import CheckpointError
from attnseg.model_files import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    _plain_tensors,
    export_checkpoint,
    is_model_path,
    load_model,
    read_model_info,
    save_model,
)
from attnseg.models.builder import build_model

SEG = {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr", "feature_size": 8}, "num_classes": 3}
CLS = {"backbone": {"name": "test_mambaout"}, "num_classes": 5}


def _experiment(tmp_path):
    return ExperimentConfig.model_validate({
        "model": SEG, "work_dir": str(tmp_path / "work"),
        "data": {"dataset": {"name": "synthetic2d", "num_classes": 3, "image_size": [32, 32]},
                 "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}},
    })


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_segmentor_round_trip_gives_equal_outputs_and_records_the_config(tmp_path):
    cfg = _experiment(tmp_path)
    model = _perturbed(build_model(cfg))
    out = save_model(model, tmp_path / "seg", cfg, class_names=["bg", "a", "b"], label_values=[0, 1, 4])
    assert out == tmp_path / "seg" and sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert sorted(os.listdir(tmp_path)) == ["seg"]  # no staging folder left
    loaded, info = load_model(out)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training and type(loaded) is type(model)
    assert (info.task, info.class_names, info.label_values) == ("segmentation", ["bg", "a", "b"], [0, 1, 4])
    assert info.normalize["mean"] == [0.5, 0.5, 0.5] and info.normalize["std"] == [0.25, 0.25, 0.25]
    assert info.format_version == FORMAT_VERSION and info.attnseg_version == "0.1.0"
    assert info.experiment_config().model.head.kwargs == {"feature_size": 8}
    # config.json is plain JSON; the weights file is safetensors (a JSON header, no pickle) with the same keys
    doc = json.loads((out / CONFIG_NAME).read_text())
    assert doc["format"] == "attnseg.model" and doc["model"]["backbone"] == {
        "name": "test_mambaout", "pretrained": None, "out_indices": None, "freeze": False}
    raw = (out / WEIGHTS_NAME).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert json.loads(header["__metadata__"]["attnseg_config"])["weights_id"] == doc["weights_id"]
    assert not raw.startswith((b"PK\x03\x04", b"\x80"))  # neither a torch zip archive nor a pickle
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())
        assert all(torch.equal(f.get_tensor(k), v) for k, v in model.state_dict().items())


def test_classifier_round_trip_and_pair_of_files(tmp_path):
    model = _perturbed(build_model(CLS, task="classification"))
    out = save_model(model, tmp_path / "m" / "cls.safetensors", CLS)
    assert sorted(os.listdir(tmp_path / "m")) == ["cls.json", "cls.safetensors"]
    x = torch.randn(3, 3, 64, 64)
    loaded, info = load_model(out)
    assert info.task == "classification" and info.experiment is None and info.model["num_classes"] == 5
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # the config travels in the safetensors header too: a lone file still loads
    (tmp_path / "m" / "cls.json").unlink()
    lone, lone_info = load_model(out)
    with torch.no_grad():
        assert torch.equal(model(x), lone(x))
    assert lone_info.weights_id == info.weights_id


def test_saving_again_replaces_both_files_and_a_mixed_pair_is_refused(tmp_path):
    a = _perturbed(build_model(CLS, task="classification"))
    b = _perturbed(build_model(CLS, task="classification"))
    save_model(a, tmp_path / "m", CLS)
    first = (tmp_path / "m" / CONFIG_NAME).read_text()
    save_model(b, tmp_path / "m", CLS)
    assert sorted(os.listdir(tmp_path / "m")) == [CONFIG_NAME, WEIGHTS_NAME]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")[0](x), b(x))
    (tmp_path / "m" / CONFIG_NAME).write_text(first)  # config of the first save beside the weights of the second
    with pytest.raises(CheckpointError, match="come from different saves"):
        load_model(tmp_path / "m")


def test_weights_that_do_not_fit_the_config_and_foreign_files_are_refused(tmp_path):
    save_model(build_model(SEG), tmp_path / "m", SEG)
    doc = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    doc["model"]["num_classes"] = 4
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"does not fit the Segmentor its config describes: shape mismatches "
                                              r"\(file vs model\) \(\d+\): .*\[3, .*\] vs \[4, "):
        load_model(tmp_path / "m")
    doc["model"]["num_classes"], doc["format_version"] = 3, FORMAT_VERSION + 1
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=f"format_version {FORMAT_VERSION + 1}; .*upgrade attnseg"):
        load_model(tmp_path / "m")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert not is_model_path(tmp_path / "plain.safetensors") and not is_model_path(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no attnseg config.*use load_pretrained"):
        load_model(tmp_path / "plain.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="folder without model.safetensors"):
        load_model(tmp_path / "empty")


def test_shared_and_strided_tensors_are_stored_as_plain_copies(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied
            self.register_buffer("t", torch.arange(16.0).reshape(4, 4).t())  # non-contiguous

    m = Tied()
    tensors = _plain_tensors(m)
    save_file(tensors, str(tmp_path / "t.safetensors"))  # refuses shared or non-contiguous tensors
    m2 = Tied()
    m2.load_state_dict({k: v for k, v in tensors.items()})
    assert torch.equal(m2.b.weight, m.a.weight) and m2.b.weight is m2.a.weight
    assert torch.equal(m2.t, m.t)


def test_load_pretrained_reads_a_model_folder(tmp_path):
    src = _perturbed(build_model(SEG))
    save_model(src, tmp_path / "m", SEG)
    dst = build_model(SEG)
    report = load_pretrained(dst, tmp_path / "m")
    assert str(report) == "all keys matched"
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())
    backbone = build_model(SEG).backbone  # the backbone alone: the decoder's keys are set aside and reported
    report = load_pretrained(backbone, tmp_path / "m")
    assert report.ignored and all(k.startswith("head.") for k in report.ignored)
    assert torch.equal(backbone.stem.conv1.weight, src.backbone.stem.conv1.weight)


def _training_checkpoint(tmp_path, model, cfg, **extra):
    state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 1,
             "hyper_parameters": {"config": cfg.model_dump(mode="json")}, **extra}
    torch.save(state, tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt"


def test_export_checkpoint(tmp_path):
    cfg = _experiment(tmp_path)
    model = _perturbed(build_model(cfg))
    ckpt = _training_checkpoint(tmp_path, model, cfg, attnseg_classes={"class_names": ["bg", "x", "y"],
                                                                        "label_values": [0, 2, 7]})
    out = export_checkpoint(ckpt, tmp_path / "exported")
    loaded, info = load_model(out)
    x = torch.randn(1, 3, 32, 36)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert info.class_names == ["bg", "x", "y"] and info.label_values == [0, 2, 7]
    assert info.source == str(ckpt) and info.experiment["data"]["dataset"]["name"] == "synthetic2d"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="records no attnseg config"):
        export_checkpoint(tmp_path / "other.ckpt", tmp_path / "x")


def test_training_writes_the_model_and_infer_reads_it_without_a_config(tmp_path, capsys):
    from PIL import Image

    from attnseg.cli import infer, train
    from tests.test_tools import tiny_cfg

    cfg = tiny_cfg(tmp_path)
    assert train.main([str(cfg)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("\n{") + 1:])  # after the model summary
    folder = tmp_path / "work" / "checkpoints"
    assert result["model"] == str(folder)
    assert {WEIGHTS_NAME, CONFIG_NAME, "last.ckpt"} <= set(os.listdir(folder))
    info = read_model_info(folder)
    assert info.source == result["best_checkpoint"] and len(info.class_names) == 3
    ckpt_sd = torch.load(result["best_checkpoint"], weights_only=True)["state_dict"]
    model, _ = load_model(folder)
    assert all(torch.equal(v, ckpt_sd[f"model.{k}"]) for k, v in model.state_dict().items())

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 45, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    assert infer.main(["--checkpoint", str(folder), str(tmp_path / "img.png"), "--out", str(tmp_path / "a"),
                       "--device", "cpu"]) == 0
    assert f"loaded {folder}: all keys matched" in capsys.readouterr().out
    assert infer.main(["--config", str(cfg), "--checkpoint", result["best_checkpoint"], str(tmp_path / "img.png"),
                       "--out", str(tmp_path / "b"), "--device", "cpu"]) == 0
    a = np.array(Image.open(tmp_path / "a" / "img_mask.png"))
    assert a.shape == (37, 45) and np.array_equal(a, np.array(Image.open(tmp_path / "b" / "img_mask.png")))
    # attnseg-test evaluates the model folder like the training checkpoint
    from attnseg.cli import test as test_tool

    for ckpt, out in ((folder, "m"), (result["best_checkpoint"], "c")):
        assert test_tool.main([str(cfg), "--checkpoint", str(ckpt), "--out-dir", str(tmp_path / f"eval_{out}")]) == 0
    capsys.readouterr()
    metrics = [json.loads((tmp_path / f"eval_{o}" / "metrics_test.json").read_text()) for o in ("m", "c")]
    assert metrics[0]["mDice"] == metrics[1]["mDice"] and metrics[0]["Dice"] == metrics[1]["Dice"]
    assert infer.main(["--checkpoint", result["best_checkpoint"], str(tmp_path / "img.png"),
                       "--out", str(tmp_path / "c")]) == 2
    assert "--config is needed" in capsys.readouterr().err


def test_module_docstring_example_runs():
    import doctest

    import attnseg.model_files

    result = doctest.testmod(attnseg.model_files, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


def test_top_level_api_saves_and_loads_the_same_model(tmp_path):
    import attnseg

    cfg = _experiment(tmp_path)
    model = attnseg.build_model(cfg).eval()
    attnseg.save_model(model, tmp_path / "m", cfg)
    loaded, info = attnseg.load_model(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert "save_model" in attnseg.__all__ and "load_model" in attnseg.__all__
