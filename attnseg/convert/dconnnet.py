"""DconnNet: official state_dicts -> attnseg (:mod:`attnseg.models.dconnnet`).

Official code: Zyun-Y/DconnNet @ e55ac71 (``model/DconnNet.py:DconnNet``; checkpoints are a plain
``model.state_dict()``). The model is a :class:`~attnseg.models.dconnnet.DconnNet` Segmentor: ``backbone.*`` =
:class:`~attnseg.backbones.resnet.ResNet` (torchvision layout, as the official ``model/resnet.py``), ``head.*`` =
:class:`~attnseg.heads.connectivity.DconnNetHead`, whose modules carry the official names.

==============================================================  ===============================================
official                                                        attnseg
==============================================================  ===============================================
``backbone.{conv1,bn1,layer1..layer4}.*``                       the same name
``sde_module.*``, ``fb{2,3,4,5}.*``, ``sb{1..4}.*``,            ``head.`` + the same name
``final_decoder.blocks.*``, ``channel_mapping.*``,
``direc_reencode.*``
``cls_pred_conv_2.*``                                           ``head.classifier.*``
==============================================================  ===============================================

Dropped, by name (:data:`DROPPED_KEYS`): ``backbone.fc.*`` (the ImageNet classifier, never used), ``cls_pred_conv.*``
(built, never called) and ``fb5.conv_3x3.*`` (``FeatureBlock(last=True)`` skips its 3x3 conv). Every other key must be
placed, or :func:`convert_state_dict` raises :class:`~attnseg.errors.CheckpointError` listing the keys it cannot place.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from attnseg.convert._strict import load_strict
from attnseg.errors import CheckpointError
from attnseg.models.dconnnet import DconnNet, dconnnet_resnet34

__all__ = ["convert_state_dict", "from_official", "is_official", "DROPPED_KEYS", "OfficialDconnNet"]

DROPPED_KEYS = (r"backbone\.fc\.(weight|bias)", r"cls_pred_conv\.(weight|bias)", r"fb5\.conv_3x3\..+")

_BACKBONE = re.compile(r"backbone\.(conv1|bn1|layer[1-4])\..+")
_HEAD = re.compile(r"(sde_module|fb[2-5]|sb[1-4]|final_decoder\.blocks|channel_mapping|direc_reencode)\..+")


def is_official(state_dict: dict[str, Any]) -> bool:
    """Whether the keys are the official ``DconnNet`` layout (head modules at the top level, no ``head.``)."""
    return any(k.startswith(("sde_module.", "cls_pred_conv_2.", "channel_mapping.")) for k in state_dict)


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rename an official ``DconnNet`` state_dict to attnseg's keys (module docstring); values pass through.

    Raises:
        CheckpointError: listing the keys that have no place.
    """
    out: dict[str, Any] = {}
    unplaced: list[str] = []
    for key, value in state_dict.items():
        if any(re.fullmatch(p, key) for p in DROPPED_KEYS):
            continue
        if _BACKBONE.fullmatch(key):
            out[key] = value
        elif _HEAD.fullmatch(key):
            out[f"head.{key}"] = value
        elif m := re.fullmatch(r"cls_pred_conv_2\.(weight|bias)", key):
            out[f"head.classifier.{m.group(1)}"] = value
        else:
            unplaced.append(key)
    if unplaced:
        raise CheckpointError(f"DconnNet: {len(unplaced)} keys have no place in attnseg's model: "
                              f"{', '.join(unplaced[:10])}")
    return out


class OfficialDconnNet(nn.Module):
    """An attnseg :class:`~attnseg.models.dconnnet.DconnNet` whose ``forward`` returns what the official one does:
    ``(logits [B, 8K, H, W], aux [B, 8K, H, W])`` (connectivity logits and the directional-prior map) in every mode.
    H and W must be divisible by 32, as for the official model; the attnseg model itself is ``self.model``."""

    def __init__(self, model: DconnNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.head.forward_with_aux(self.model.backbone.forward_pyramid(x), x)


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> OfficialDconnNet:
    """Build the attnseg DconnNet for an official ``DconnNet(num_class=K)`` and load ``state_dict`` strictly.

    Args:
        constructor: ``{"name": "DconnNet", "kwargs": {"num_class": K}}`` (``num_class`` defaults to 1).
        state_dict: the official model's state_dict.

    Returns:
        :class:`OfficialDconnNet` in eval mode (``forward(x) -> (logits, aux)``).
    """
    name = constructor.get("name")
    if name != "DconnNet":
        raise ValueError(f"dconnnet converter builds the official 'DconnNet' class, got constructor name {name!r}")
    kwargs = dict(constructor.get("kwargs") or {})
    num_class = int(kwargs.pop("num_class", 1))
    if kwargs:
        raise ValueError(f"unexpected DconnNet constructor arguments {sorted(kwargs)} (the official class takes "
                         "num_class only)")
    model = dconnnet_resnet34(in_chans=3, num_classes=num_class)
    load_strict(model, convert_state_dict(state_dict), "official DconnNet state_dict")
    return OfficialDconnNet(model).eval()
