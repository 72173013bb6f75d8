"""MambaOut: official (yuweihao/MambaOut) and timm state_dicts -> attnseg's layout.

attnseg uses timm's layout, so timm checkpoints pass through unchanged and official ones are renamed
by the table below (the same mapping as ``timm.models.mambaout.checkpoint_filter_fn``).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from attnseg.backbones.mambaout import MambaOut

__all__ = ["convert_state_dict", "from_official", "is_official"]

# (official pattern, attnseg replacement), applied in order; every official key matches exactly one rule.
_RULES: list[tuple[str, str]] = [
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.([1-9]\d*)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^norm\.", "head.norm."),
    (r"^head\.fc1\.", "head.pre_logits.fc."),
    (r"^head\.norm\.", "head.pre_logits.norm."),
    (r"^head\.fc2\.", "head.fc."),
]


def is_official(state_dict: dict[str, Any]) -> bool:
    return any(k.startswith("downsample_layers.") for k in state_dict)


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Official or timm MambaOut keys -> attnseg keys (timm and attnseg keys are returned as they are)."""
    if not is_official(state_dict):
        return dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for pattern, repl in _RULES:
            if re.match(pattern, key):
                new = re.sub(pattern, repl, key)
                break
        else:
            raise KeyError(f"unexpected key in an official MambaOut checkpoint: {key!r}")
        out[new] = value
    return out


_FACTORY_PREFIX = "mambaout_"


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> MambaOut:
    """Build ``MambaOut(**kwargs)`` (or a named variant such as ``mambaout_tiny``) and load strictly."""
    from attnseg.registry import BACKBONES

    name = str(constructor.get("name", "MambaOut")).rsplit(":", 1)[-1]
    kwargs = dict(constructor.get("kwargs", {}))
    for drop in ("pretrained",):
        kwargs.pop(drop, None)
    # The dense pyramid norms are attnseg additions, absent from official weights.
    kwargs.setdefault("pyramid_norm", False)
    model = BACKBONES.get(name)(**kwargs) if name.startswith(_FACTORY_PREFIX) else MambaOut(**kwargs)
    model.load_state_dict(convert_state_dict(state_dict), strict=True)
    return model.eval()
