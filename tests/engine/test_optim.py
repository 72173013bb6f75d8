import math

import pytest
import torch
from torch import nn

from attnseg.config import OptimizerConfig, SchedulerConfig
from attnseg.engine.optim import build_optimizer, lr_lambda, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.stem = nn.Conv2d(3, 4, 3)
        self.backbone.stages = nn.ModuleList([nn.Module(), nn.Module()])
        self.backbone.stages[0].blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.backbone.stages[1].blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.backbone.norm = nn.LayerNorm(4)
        self.backbone.pos_embed = nn.Parameter(torch.zeros(1, 4, 4))
        self.head = nn.Conv2d(4, 2, 1)


def _group_of(groups, param):
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_no_decay_on_norms_biases_and_position_tables():
    m = Tiny()
    groups = param_groups(m, OptimizerConfig(weight_decay=0.05))
    assert _group_of(groups, m.backbone.stem.weight)["weight_decay"] == 0.05
    assert _group_of(groups, m.backbone.stem.bias)["weight_decay"] == 0.0
    assert _group_of(groups, m.backbone.norm.weight)["weight_decay"] == 0.0
    assert _group_of(groups, m.backbone.pos_embed)["weight_decay"] == 0.0
    assert _group_of(groups, m.head.weight)["weight_decay"] == 0.05
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(m.parameters()))


def test_layer_decay_and_backbone_multiplier():
    m = Tiny()
    cfg = OptimizerConfig(lr=1.0, layer_decay=0.5, backbone_lr_mult=0.1)
    groups = param_groups(m, cfg)
    head_lr = _group_of(groups, m.head.weight)["lr"]
    stem_lr = _group_of(groups, m.backbone.stem.weight)["lr"]
    s0 = _group_of(groups, m.backbone.stages[0].blocks[0].weight)["lr"]
    s1 = _group_of(groups, m.backbone.stages[1].blocks[0].weight)["lr"]
    assert head_lr == 1.0
    assert stem_lr < s0 < s1 <= 0.1
    assert s1 / s0 == pytest.approx(2.0)


def test_sgd_and_adamw():
    m = Tiny()
    assert isinstance(build_optimizer(m, OptimizerConfig(name="sgd", lr=0.1)), torch.optim.SGD)
    assert isinstance(build_optimizer(m, OptimizerConfig(name="adamw")), torch.optim.AdamW)


def test_schedules():
    cos = lr_lambda(SchedulerConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1), 110)
    assert cos(0) == pytest.approx(1 / 11)
    assert cos(9) == pytest.approx(10 / 11)
    assert cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(110) == pytest.approx(0.1)
    poly = lr_lambda(SchedulerConfig(name="poly", power=1.0), 100)
    assert poly(50) == pytest.approx(0.5)
    step = lr_lambda(SchedulerConfig(name="step", milestones=[0.5], gamma=0.1), 100)
    assert step(49) == 1.0 and step(50) == pytest.approx(0.1)
