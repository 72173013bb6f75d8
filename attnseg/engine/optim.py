"""Optimizers with parameter groups, and step-based learning-rate schedules.

Parameter groups follow the usual recipe of the backbones' papers: no weight decay on norms, biases,
1-D parameters and position/bias tables; optional layer-wise learning-rate decay over the backbone
(deeper blocks keep more of the base rate; the head keeps all of it); an optional backbone lr multiplier.
Schedules are ``LambdaLR`` multipliers evaluated per optimizer step, so they are exact under gradient
accumulation, resume and any number of devices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import nn

from attnseg.config import OptimizerConfig, SchedulerConfig

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "lr_lambda"]

# Parameter names (lower case) that never get weight decay besides every 1-D tensor.
_NO_DECAY_PATTERNS = ("pos_embed", "rel_pos", "relative_position", "rpb", "cls_token", "absolute_pos", "gamma")


def _no_decay(name: str, param: nn.Parameter, extra: set[str]) -> bool:
    lname = name.lower()
    return param.ndim <= 1 or name in extra or any(p in lname for p in _NO_DECAY_PATTERNS)


def _layer_id(name: str, num_layers: int) -> int:
    """Depth index of a backbone parameter: 0 for the stem, stage/block position after it.

    Works for the ``stem`` / ``stages.i.(downsample|blocks.j)`` layout the hierarchical backbones share and
    for ``blocks.j`` (ViT-style); anything unrecognised counts as the deepest layer (no decay).
    """
    if re.match(r"(stem|patch_embed|cls_token|pos_embed)", name):
        return 0
    m = re.match(r"stages\.(\d+)\.(?:blocks\.(\d+)|downsample)", name)
    if m:
        return int(m.group(1)) + 1  # one id per stage keeps the rule family-independent
    m = re.match(r"blocks\.(\d+)", name)
    if m:
        return int(m.group(1)) + 1
    return num_layers - 1


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Split ``model``'s trainable parameters into optimizer groups.

    ``model`` may be a Segmentor/Classifier (with a ``backbone`` attribute) or a bare backbone.
    Returns a list of ``{"params", "weight_decay", "lr", "name"}`` dicts with ``lr`` already scaled.
    """
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    extra_no_decay: set[str] = set()
    for owner in (model, backbone):
        if owner is not None and hasattr(owner, "no_weight_decay"):
            extra_no_decay |= set(owner.no_weight_decay())
    num_layers = 6  # stem + up to 4 stages + head
    groups: dict[tuple[str, float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_backbone = id(param) in backbone_ids
        local = name[len("backbone."):] if is_backbone and name.startswith("backbone.") else name
        decay = 0.0 if cfg.no_decay_norm_bias and _no_decay(local, param, extra_no_decay) else cfg.weight_decay
        scale = 1.0
        if is_backbone:
            scale *= cfg.backbone_lr_mult
            if cfg.layer_decay is not None:
                scale *= cfg.layer_decay ** (num_layers - 1 - _layer_id(local, num_layers))
        part = "backbone" if is_backbone else "head"
        groups.setdefault((part, decay, scale), []).append(param)
    return [
        {"params": params, "weight_decay": decay, "lr": cfg.lr * scale, "name": f"{part}_wd{decay:g}_lr{scale:.3g}"}
        for (part, decay, scale), params in groups.items()
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over :func:`param_groups`."""
    groups = param_groups(model, cfg)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def lr_lambda(cfg: SchedulerConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``s`` (0-based) for ``total_steps`` steps in all."""
    total_steps = max(int(total_steps), 1)
    warmup = min(cfg.warmup_steps + int(cfg.warmup_ratio * total_steps), total_steps - 1)
    floor = cfg.min_lr_ratio

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(max((step - warmup) / max(total_steps - warmup, 1), 0.0), 1.0)
        if cfg.name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.name == "poly":
            return floor + (1 - floor) * (1 - progress) ** cfg.power
        if cfg.name == "step":
            drops = sum(progress >= m for m in cfg.milestones)
            return max(cfg.gamma**drops, floor)
        return 1.0

    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int):
    """A per-step ``LambdaLR`` following :func:`lr_lambda` for every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
