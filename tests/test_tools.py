"""The command-line tools: --print-config, inference at odd sizes, and one clear message per bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from attnseg.cli import infer, test, train

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path, **data_overrides):
    cfg = {
        "work_dir": str(tmp_path / "work"),
        "model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr", "feature_size": 8},
                  "num_classes": 3},
        "data": {"dataset": {"name": "synthetic2d", "num_classes": 3, "image_size": [32, 32], "num_train": 4,
                             "num_val": 2, "num_test": 2}, "batch_size": 2},
        "trainer": {"max_epochs": 1, "progress_bar": "none", "loggers": ["csv"], "accelerator": "cpu"},
        "evaluation": {"hd95": False},
    }
    cfg["data"].update(data_overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def expect_error(capsys, main, argv, *fragments):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, f"{f!r} not in {err!r}"
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_cfg(tmp)
    assert train.main([str(cfg)]) == 0
    return cfg, tmp / "work" / "checkpoints" / "last.ckpt"


def test_print_config_shows_merged_validated_config(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    assert train.main([str(cfg), "--print-config", "--set", "model.head.feature_size=24"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["head"] == {"name": "unetr", "feature_size": 24}
    assert out["optimizer"]["name"] == "adamw"  # default filled in


def test_every_shipped_config_validates(capsys):
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    configs = [c for c in configs if "_base_" not in c.parts]
    assert configs
    for c in configs:
        assert train.main([str(c), "--print-config"]) == 0, c
    capsys.readouterr()


def test_infer_returns_mask_of_input_size_for_odd_png(trained, tmp_path, capsys):
    cfg, ckpt = trained
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (333, 517, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(tmp_path / "grey.png")
    out = tmp_path / "out"
    assert infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "odd.png"),
                       str(tmp_path / "grey.png"), "--out", str(out)]) == 0
    mask = np.array(Image.open(out / "odd_mask.png"))
    assert mask.shape == (333, 517) and mask.max() < 3
    assert np.array(Image.open(out / "odd_overlay.png")).shape == (333, 1034, 3)
    assert np.array(Image.open(out / "grey_mask.png")).shape == (40, 50)
    # sliding window on the same image gives a mask of the same size
    assert infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "odd.png"),
                       "--out", str(tmp_path / "sw"), "--window", "128", "--tta"]) == 0
    assert np.array(Image.open(tmp_path / "sw" / "odd_mask.png")).shape == (333, 517)


def test_test_tool_prints_table_and_writes_reports(trained, tmp_path, capsys):
    import csv
    import json

    cfg, ckpt = trained
    out = tmp_path / "report"
    assert test.main([str(cfg), "--checkpoint", str(ckpt), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mDice" in printed and "class" in printed
    results = json.loads((out / "metrics_test.json").read_text())
    assert 0.0 <= results["mDice"] <= 1.0 and len(results["Dice"]) == 3 and len(results["NSD"]) == 3
    with open(out / "cases_test.csv") as f:
        rows = list(csv.DictReader(f))
    names = results["class_names"]
    assert len(rows) == 2 and {"case", f"Dice_{names[1]}", f"NSD_{names[2]}", "mDice", "mNSD"} <= set(rows[0])
    assert f"Dice_{names[0]}" not in rows[0]  # background is left out, as in the means
    # the per-case means agree with the JSON's per-case rows and stay in range
    for row, case in zip(rows, results["cases"]):
        assert row["case"] == case["case"] and float(row["mDice"]) == pytest.approx(case["mDice"], rel=1e-5)
        assert 0.0 <= float(row["mNSD"]) <= 1.0
    md = (out / "report_test.md").read_text()
    assert "| mDice |" in md and "Per case:" in md and rows[0]["case"] in md
    box = Image.open(out / "boxplot_test.png")
    assert box.size[0] > 100 and box.size[1] > 100


def test_training_plots_its_curves(trained):
    cfg, ckpt = trained
    curves = ckpt.parents[1] / "curves.png"
    width, height = Image.open(curves).size
    # loss and score panels (2 steps log no learning rate: Lightning logs every 50 steps)
    assert width == 1000 and height == 360


def test_missing_and_malformed_config(tmp_path, capsys):
    expect_error(capsys, train.main, [str(tmp_path / "nope.yaml")], "config file not found", "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: {backbone: [\n")
    expect_error(capsys, train.main, [str(tmp_path / "bad.yaml")], "malformed YAML", "bad.yaml", "line")


def test_unknown_keys_and_names(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    expect_error(capsys, train.main, [str(cfg), "--set", "model.backbone.name=mambaout_femt", "--set",
                                      "data.batch_sze=3"],
                 "model.backbone.name: 'mambaout_femt' is not registered; did you mean 'mambaout_femto'?",
                 "data.batch_sze: unknown key; did you mean 'batch_size'?")


def test_missing_checkpoint_and_checkpoint_of_another_model(trained, tmp_path, capsys):
    cfg, _ = trained
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    expect_error(capsys, infer.main, ["--config", str(cfg), "--checkpoint", str(tmp_path / "none.ckpt"), str(img),
                                      "--out", str(tmp_path / "o")], "none.ckpt")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}, other)
    expect_error(capsys, test.main, [str(cfg), "--checkpoint", str(other)], "other.pth")


def test_unreadable_image_is_named(trained, tmp_path, capsys):
    cfg, ckpt = trained
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    expect_error(capsys, infer.main, ["--config", str(cfg), "--checkpoint", str(ckpt), str(bad), "--out",
                                      str(tmp_path / "o")], "broken.png")


def test_wrong_channel_count_is_named(trained, tmp_path, capsys):
    import tifffile

    cfg, ckpt = trained
    two = tmp_path / "two.tif"
    tifffile.imwrite(two, np.zeros((32, 32, 2), np.uint8), photometric="minisblack", planarconfig="contig")
    expect_error(capsys, infer.main, ["--config", str(cfg), "--checkpoint", str(ckpt), str(two), "--out",
                                      str(tmp_path / "o")], "two.tif", "channel")


def _folder_dataset(root, *, mask_size=(32, 32), mask_value=255, n=6):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / "images" / f"case{i}.png")
        m = np.zeros(mask_size, np.uint8)
        m[4:12, 4:12] = mask_value
        Image.fromarray(m).save(root / "masks" / f"case{i}.png")


def _folder_cfg(tmp_path, root):
    return tiny_cfg(tmp_path, dataset={"name": "folder2d", "root": str(root), "mask_values": [0, 255],
                                       "val_ratio": 0.34})


def test_folder2d_size_mismatch_labels_outside_and_empty(tmp_path, capsys):
    r1 = tmp_path / "mismatch"
    _folder_dataset(r1, mask_size=(30, 32))
    cfg = _folder_cfg(tmp_path, r1)
    expect_error(capsys, train.main, [str(cfg), "--set", "model.num_classes=2"], "case", "size")
    r2 = tmp_path / "outside"
    _folder_dataset(r2, mask_value=7)
    cfg = _folder_cfg(tmp_path, r2)
    expect_error(capsys, train.main, [str(cfg), "--set", "model.num_classes=2"], "case", "7")
    r3 = tmp_path / "empty"
    (r3 / "images").mkdir(parents=True)
    (r3 / "masks").mkdir()
    cfg = _folder_cfg(tmp_path, r3)
    expect_error(capsys, train.main, [str(cfg), "--set", "model.num_classes=2"], "images")


def test_class_count_mismatch_between_model_and_dataset(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    expect_error(capsys, train.main, [str(cfg), "--set", "model.num_classes=5"],
                 "model.num_classes is 5 but the train dataset has 3 classes")


def test_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: config file not found")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    """strategy=ddp with 2 CPU processes (gloo): the distributed code path that multi-GPU/multi-node runs take."""
    cfg = tiny_cfg(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), str(cfg), "--set", "trainer.strategy=ddp",
         "--set", "trainer.devices=2", "--set", "trainer.accelerator=cpu", "--set", "trainer.loggers=[csv, tensorboard]"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "work" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1  # 4 samples, batch 2 per process, 2 processes -> 1 step per epoch
    assert list((tmp_path / "work" / "tensorboard").glob("events.*"))


def test_resume_flag_continues_from_last_checkpoint(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    assert train.main([str(cfg)]) == 0
    assert train.main([str(cfg), "--resume", "--set", "trainer.max_epochs=2"]) == 0
    ckpt = torch.load(tmp_path / "work" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 1
    capsys.readouterr()  # the runs' own log lines (Lightning logs to stderr when this test runs alone)
    expect_error(capsys, train.main, [str(cfg), "--resume", "--work-dir", str(tmp_path / "fresh")],
                 "no checkpoint to resume from", "fresh")


def test_new_run_refuses_to_mix_with_earlier_checkpoints(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    assert train.main([str(cfg)]) == 0
    before = (tmp_path / "work" / "checkpoints" / "last.ckpt").read_bytes()
    capsys.readouterr()
    expect_error(capsys, train.main, [str(cfg)], "already holds checkpoints of an earlier run", "--resume")
    assert (tmp_path / "work" / "checkpoints" / "last.ckpt").read_bytes() == before
