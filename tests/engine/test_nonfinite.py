"""Non-finite training losses: the message (step, samples, terms, where it starts) and the configured actions."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import yaml

from attnseg.cli import train
from attnseg.config import validate_config
from attnseg.datasets.synthetic import SyntheticSegmentation
from attnseg.engine.losses import DiceCELoss
from attnseg.engine.nonfinite import NonFiniteLossError, NonFiniteLossGuard, describe_nonfinite_loss
from attnseg.errors import ConfigError
from tests.test_tools import tiny_cfg


def _batch(nan_sample: int | None = None):
    images = torch.randn(3, 1, 8, 8)
    if nan_sample is not None:
        images[nan_sample, 0, 2, 3] = math.nan
    return {"image": images, "meta": [{"id": f"case_{i}"} for i in range(3)]}


def test_message_names_the_step_the_samples_the_terms_and_where_it_starts():
    terms = {"dice": torch.tensor(0.4), "ce": torch.tensor(math.inf)}
    msg = describe_nonfinite_loss(12, 1, 5, _batch(nan_sample=1), torch.full((3, 2, 8, 8), math.nan), terms)
    assert msg.startswith("non-finite training loss at step 12 (epoch 1, batch 5)")
    assert "loss terms: dice = 0.4, ce = inf; non-finite: ce" in msg
    assert "the input images of samples case_1 hold NaN or infinite values" in msg
    assert msg.endswith("batch samples: case_0, case_1, case_2")
    # finite inputs, non-finite output: the forward pass
    msg = describe_nonfinite_loss(3, 0, 3, _batch(), torch.full((3, 2, 8, 8), math.inf), {"loss": torch.tensor(math.nan)})
    assert "the inputs are finite but the model's output is not: the forward pass overflowed" in msg
    # finite inputs and output: the loss itself
    msg = describe_nonfinite_loss(3, 0, 3, _batch(), torch.zeros(3, 2, 8, 8), {"loss": torch.tensor(math.nan)})
    assert "the loss itself overflows" in msg
    # no meta: positions in the batch
    assert "batch samples: #0, #1" in describe_nonfinite_loss(0, 0, 0, {"image": torch.zeros(2, 1, 4, 4)})


def test_guard_actions_and_the_consecutive_limit(caplog):
    finite, nan = torch.tensor(1.0), torch.tensor(math.nan)
    with pytest.raises(NonFiniteLossError, match=r"step 7 .*action: stop"):
        NonFiniteLossGuard("stop").check(nan, 7, 0, 7, _batch())
    guard = NonFiniteLossGuard("skip", max_consecutive=2)
    with caplog.at_level(logging.WARNING, logger="attnseg.engine.nonfinite"):
        assert guard.check(nan, 1, 0, 1, _batch()) is None
    assert "Batch skipped (1 non-finite so far)" in caplog.text
    assert guard.check(finite, 2, 0, 2, _batch()) is finite and guard.consecutive == 0
    assert guard.check(nan, 3, 0, 3, _batch()) is None and guard.check(nan, 4, 0, 4, _batch()) is None
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        guard.check(nan, 5, 0, 5, _batch())
    assert guard.total == 4
    lower = NonFiniteLossGuard("lower_scale")
    assert lower.check(nan, 1, 0, 1, _batch()) is nan  # the GradScaler skips the step and lowers its scale
    # terms are computed only when the loss is non-finite
    calls = []
    NonFiniteLossGuard("skip").check(finite, 0, 0, 0, _batch(), terms=lambda: calls.append(1))
    assert not calls


def test_dice_ce_terms_sum_to_the_loss():
    loss = DiceCELoss(3, lambda_dice=0.3, lambda_ce=2.0)
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    terms = loss.terms(logits, target)
    assert set(terms) == {"dice", "ce"}
    torch.testing.assert_close(terms["dice"] + terms["ce"], loss(logits, target))


def _config(tmp_path, action=None):
    """test_tools' tiny segmentation config, logging every step, with ``trainer.nonfinite_loss.action``."""
    path = tiny_cfg(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["log_every_n_steps"] = 1
    if action:
        cfg["trainer"]["nonfinite_loss"] = {"action": action}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def nan_training_sample(monkeypatch):
    """Training sample 2 of synthetic2d is NaN-filled."""
    generate = SyntheticSegmentation.generate

    def poisoned(self, index):
        image, mask = generate(self, index)
        if self.split == "train" and index == 2:
            image = np.full_like(image, np.nan)
        return image, mask

    monkeypatch.setattr(SyntheticSegmentation, "generate", poisoned)


def test_training_stops_at_the_nan_sample_with_its_name(tmp_path, capsys, nan_training_sample):
    rc = train.main([str(_config(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2, err
    message = err[err.index("error: "):]
    assert message.startswith("error: non-finite training loss at step ")
    assert "the input images of samples train_00002 hold NaN" in message and "Traceback" not in message
    assert "loss terms: dice = nan, ce = nan; non-finite: dice, ce" in message  # the default loss is Dice + CE


def test_training_skips_the_nan_batch_and_ends_with_finite_weights(tmp_path, caplog, nan_training_sample):
    with caplog.at_level(logging.WARNING, logger="attnseg.engine.nonfinite"):
        assert train.main([str(_config(tmp_path, action="skip"))]) == 0
    skipped = [r.getMessage() for r in caplog.records if r.name == "attnseg.engine.nonfinite"]
    assert len(skipped) == 1 and "train_00002" in skipped[0] and skipped[0].endswith("Batch skipped (1 non-finite "
                                                                                      "so far)")
    ckpt = torch.load(tmp_path / "work" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # without the skip, the NaN batch's gradients would have made every weight NaN
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    metrics = (tmp_path / "work" / "logs" / "metrics.csv").read_text()
    assert "train/nonfinite_steps" in metrics


def test_lower_scale_needs_fp16_mixed_precision(tmp_path):
    raw = yaml.safe_load(_config(tmp_path, action="lower_scale").read_text())
    with pytest.raises(ConfigError, match=r"trainer.nonfinite_loss.action: 'lower_scale' needs trainer.precision: "
                                          r"16-mixed .* got '32-true'"):
        validate_config(raw)
    raw["trainer"]["precision"] = "16-mixed"
    assert validate_config(raw).trainer.nonfinite_loss.action == "lower_scale"


def test_skip_is_refused_with_several_processes(tmp_path):
    from types import SimpleNamespace

    from attnseg.engine.runner import build_task

    cfg = validate_config(yaml.safe_load(_config(tmp_path, action="skip").read_text()))
    task = build_task(cfg)
    task._trainer = SimpleNamespace(world_size=2)  # what Lightning attaches under DDP with two ranks
    with pytest.raises(ConfigError, match=r"'skip' works in one process only .* the other 1 waiting"):
        task.on_fit_start()
    task._trainer = SimpleNamespace(world_size=1)
    task.on_fit_start()
