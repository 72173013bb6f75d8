"""End-to-end training on tiny synthetic data: a few steps, resume, determinism."""

import lightning.pytorch as pl
import pytest
import torch

from attnseg.config import validate_config
from attnseg.engine.runner import train


def tiny_config(tmp_path, **trainer):
    return validate_config({
        "work_dir": str(tmp_path),
        "model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr", "feature_size": 8},
                  "num_classes": 3},
        "data": {"dataset": {"name": "synthetic2d", "num_classes": 3, "image_size": [32, 32], "num_train": 8,
                             "num_val": 4, "num_test": 4},
                 "batch_size": 4, "augment": None},
        "optimizer": {"lr": 0.003},
        "scheduler": {"name": "cosine", "warmup_steps": 1},
        "trainer": {"max_epochs": 2, "progress_bar": "none", "loggers": ["csv"], "deterministic": True,
                    "accelerator": "cpu", "devices": 1, **trainer},
    })


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_few_step_training_writes_checkpoints_logs_and_metrics(tmp_path):
    result = train(tiny_config(tmp_path))
    assert result["global_step"] == 4  # 2 epochs x 2 batches
    ckpt = _weights(result["last_checkpoint"])
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 1
    assert any(k.startswith("model.backbone.") for k in ckpt["state_dict"])
    assert any(k.startswith("model.head.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["config"]["model"]["backbone"]["name"] == "test_mambaout"
    assert 0.0 <= result["metrics"]["val/mDice"] <= 1.0
    assert (tmp_path / "logs" / "metrics.csv").is_file()
    assert (tmp_path / "config.yaml").is_file()
    assert list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_two_seeded_runs_give_identical_weights(tmp_path):
    a = _weights(train(tiny_config(tmp_path / "a"))["last_checkpoint"])["state_dict"]
    b = _weights(train(tiny_config(tmp_path / "b"))["last_checkpoint"])["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


class StopAfterEpoch(pl.Callback):
    """Interrupts a run after ``epoch`` epochs, as a crash or a time limit would (after the checkpoint)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epoch:
            trainer.should_stop = True


def test_resume_continues_steps_optimizer_and_schedule_exactly(tmp_path):
    straight = _weights(train(tiny_config(tmp_path / "straight", max_epochs=4))["last_checkpoint"])
    first = train(tiny_config(tmp_path / "resumed", max_epochs=4), callbacks=[StopAfterEpoch(2)])
    assert first["global_step"] == 4
    resumed = _weights(train(tiny_config(tmp_path / "resumed", max_epochs=4), resume=True)["last_checkpoint"])
    assert resumed["global_step"] == straight["global_step"] == 8
    assert resumed["epoch"] == straight["epoch"]
    # LR schedule continued where it stopped (same scheduler state and last lr).
    assert resumed["lr_schedulers"][0]["last_epoch"] == straight["lr_schedulers"][0]["last_epoch"]
    assert resumed["lr_schedulers"][0]["_last_lr"] == pytest.approx(straight["lr_schedulers"][0]["_last_lr"])
    # Optimizer moments and weights equal to the uninterrupted run.
    s_opt, r_opt = straight["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    assert s_opt.keys() == r_opt.keys()
    for k in s_opt:
        assert torch.allclose(s_opt[k]["exp_avg"], r_opt[k]["exp_avg"], atol=1e-7)
    for k, v in straight["state_dict"].items():
        assert torch.allclose(v, resumed["state_dict"][k], atol=1e-6), k


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from attnseg.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint to resume from at .*last.ckpt$"):
        train(tiny_config(tmp_path), resume=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best-000.ckpt").write_bytes(b"")  # killed between the best and the last write
    with pytest.raises(CheckpointError, match=r"holds only best-000.ckpt \(a run stopped before its first "
                                              r"last.ckpt\): start afresh in another --work-dir, or remove them"):
        train(tiny_config(tmp_path), resume=True)


class Tiny3d(torch.nn.Module):
    """A stand-in 3D model: the task must not assume 2D anywhere."""

    def __init__(self, in_chans, num_classes):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv3d(in_chans, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv3d(8, num_classes, 1))

    def forward(self, x):
        return self.net(x)


def test_segmentation_task_runs_3d(tmp_path):
    import lightning.pytorch as pl

    from attnseg.engine.losses import DiceCELoss
    from attnseg.engine.runner import build_dataloader, build_dataset
    from attnseg.engine.tasks import SegmentationTask

    cfg = validate_config({
        "model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr"}, "num_classes": 3,
                  "in_chans": 1, "spatial_dims": 3},
        "data": {"dataset": {"name": "synthetic3d", "num_classes": 3, "image_size": [16, 16, 16], "num_train": 2,
                             "num_val": 2, "num_test": 2, "in_chans": 1}, "batch_size": 2},
        "evaluation": {"hd95": True},
    })
    task = SegmentationTask(Tiny3d(1, 3), DiceCELoss(3), cfg.model_dump(mode="json"))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(task, build_dataloader(cfg, build_dataset(cfg, "train"), "train"),
                build_dataloader(cfg, build_dataset(cfg, "val"), "val"))
    trainer.test(task, build_dataloader(cfg, build_dataset(cfg, "test"), "test"), verbose=False)
    assert trainer.global_step == 1
    res = task.test_results
    assert len(res["Dice"]) == 3 and 0.0 <= res["mDice"] <= 1.0
    assert "mHD95" in res


def test_ema_accumulation_clipping_and_bf16(tmp_path):
    cfg = tiny_config(tmp_path, max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=1.0,
                      precision="bf16-mixed", ema={"enabled": True, "decay": 0.9})
    result = train(cfg)
    assert result["global_step"] == 1  # 2 batches accumulated into one optimizer step
    ckpt = _weights(result["last_checkpoint"])
    assert any("EMAWeightAveraging" in k for k in ckpt["callbacks"])


def test_classification_with_mixup_and_cutmix(tmp_path):
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for c in range(3):
            (tmp_path / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                img = np.zeros((40, 40, 3), np.uint8)
                img[:, :, c] = 200
                Image.fromarray(img).save(tmp_path / "data" / split / f"c{c}" / f"{i}.png")
    cfg = validate_config({
        "task": "classification", "work_dir": str(tmp_path / "work"),
        "model": {"backbone": {"name": "test_mambaout"}, "num_classes": 3},
        "data": {"dataset": {"name": "imagefolder", "root": str(tmp_path / "data"), "image_size": [32, 32]},
                 "batch_size": 4},
        "classification": {"label_smoothing": 0.1, "mixup_alpha": 0.4, "cutmix_alpha": 1.0},
        "optimizer": {"lr": 0.01},
        "trainer": {"max_epochs": 3, "progress_bar": "none", "loggers": ["csv"], "accelerator": "cpu"},
    })
    result = train(cfg)
    assert result["global_step"] == 9
    assert 0.0 <= result["metrics"]["val/top1"] <= 1.0 and result["metrics"]["val/top5"] == 1.0
