"""The training-memory estimate (issue 11): parameters, gradients, optimizer state and saved activations, checked
against the device's free memory before training."""

from __future__ import annotations

import logging

import torch
from torch import nn

from attnseg.engine import memory
from attnseg.engine.memory import MemoryEstimate, check_training_memory, estimate_training_memory


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


def test_parameters_gradients_and_optimizer_state_are_counted_exactly():
    model = _mlp()
    n = sum(p.numel() for p in model.parameters())  # 10*20 + 20 + 20*5 + 5 = 325
    est = estimate_training_memory(model, torch.randn(1, 10), batch_size=8)
    assert (est.weights, est.gradients, est.optimizer) == (4 * n, 4 * n, 8 * n)  # fp32; AdamW: two moments
    assert estimate_training_memory(model, torch.randn(1, 10), 8, optimizer="sgd").optimizer == 4 * n
    model[0].requires_grad_(False)  # frozen: weights only
    frozen = estimate_training_memory(model, torch.randn(1, 10), 8)
    assert frozen.weights == 4 * n and frozen.gradients == 4 * (20 * 5 + 5)


def test_activations_are_the_saved_tensors_once_each_times_the_batch():
    model = _mlp()
    est = estimate_training_memory(model, torch.randn(1, 10), batch_size=8)
    # Linear 1 saves its input [1, 10]; ReLU saves its output [1, 20], which Linear 2 saves too (counted once)
    assert est.activations_per_sample == 4 * (10 + 20)
    assert est.activations == 8 * est.activations_per_sample
    assert est.total == est.weights + est.gradients + est.optimizer + est.activations
    half = estimate_training_memory(model, torch.randn(1, 10), 8, precision="bf16-mixed")
    assert half.activations_per_sample == est.activations_per_sample // 2
    # a conv net's activations grow with the input area
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    small = estimate_training_memory(conv, torch.randn(1, 3, 16, 16), 1).activations_per_sample
    large = estimate_training_memory(conv, torch.randn(1, 3, 32, 32), 1).activations_per_sample
    assert large == 4 * small == 4 * 4 * (3 + 8) * 16 * 16


def test_the_estimate_leaves_no_trace():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 8, 8)
    rng = torch.get_rng_state()
    estimate_training_memory(model, x, 4)
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # running stats untouched
    assert torch.equal(torch.get_rng_state(), rng)


def test_warning_when_it_does_not_fit(caplog):
    est = MemoryEstimate(weights=2**30, gradients=2**30, optimizer=2**31, activations_per_sample=2**28, batch_size=16)
    assert est.total == 8 * 2**30
    with caplog.at_level(logging.INFO, logger="attnseg.engine.memory"):
        assert check_training_memory(est, 16 * 2**30, "cpu")
        assert not check_training_memory(est, 6 * 2**30, "cuda")
    info, warning = caplog.records
    assert info.levelno == logging.INFO and "8.00 GiB" in info.getMessage()
    text = warning.getMessage()
    assert warning.levelno == logging.WARNING
    assert text.startswith("training needs at least 8.00 GiB (weights 1.00 GiB, gradients 1.00 GiB, optimizer state "
                           "2.00 GiB, activations 4.00 GiB = 16 x 0.25 GiB per sample), more than the 6.00 GiB "
                           "available on cuda")
    assert "data.batch_size" in text and "trainer.memory_check: false" in text


def test_available_memory_reads_the_cpu_and_cgroup(monkeypatch):
    assert memory.available_memory("cpu") > 0
    monkeypatch.setattr(memory, "_cgroup_free", lambda: 12345)
    assert memory.available_memory("cpu") == 12345  # the lower of MemAvailable and the container's limit
    assert memory.available_memory("meta") is None


def test_training_warns_before_the_first_step(tmp_path, caplog, monkeypatch):
    import yaml

    from attnseg.cli import train
    from tests.test_tools import tiny_cfg

    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)
    cfg = tiny_cfg(tmp_path)
    with caplog.at_level(logging.WARNING, logger="attnseg.engine.memory"):
        assert train.main([str(cfg)]) == 0  # a warning, not a refusal
    (record,) = [r for r in caplog.records if r.name == "attnseg.engine.memory"]
    assert "training needs at least" in record.getMessage() and "available on cpu" in record.getMessage()
    raw = yaml.safe_load(cfg.read_text())
    raw["trainer"]["memory_check"] = False
    raw["work_dir"] = str(tmp_path / "quiet")
    cfg.write_text(yaml.safe_dump(raw))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attnseg.engine.memory"):
        assert train.main([str(cfg)]) == 0
    assert not [r for r in caplog.records if r.name == "attnseg.engine.memory"]
