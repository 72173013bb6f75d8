"""Shared by the converters: strict loading with one error that lists every mismatch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnseg.errors import CheckpointError

__all__ = ["load_strict", "unwrap_state_dict"]

WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")


def load_strict(model: nn.Module, converted: dict[str, Any], what: str) -> nn.Module:
    """Load ``converted`` into ``model`` strictly and return it in eval mode.

    Raises:
        CheckpointError: naming ``what`` and listing missing keys, unexpected keys and shape mismatches.
    """
    model_sd = model.state_dict()
    missing = [k for k in model_sd if k not in converted]
    wrong = [f"{k}: {list(v.shape)} vs {list(model_sd[k].shape)}" for k, v in converted.items()
             if k in model_sd and isinstance(v, torch.Tensor) and v.shape != model_sd[k].shape]
    extra = [k for k in converted if k not in model_sd]
    if missing or wrong or extra:
        parts = [f"{label} ({len(items)}): {', '.join(items[:10])}" for label, items in
                 (("missing", missing), ("unexpected", extra), ("shape (checkpoint vs model)", wrong)) if items]
        raise CheckpointError(f"{what}: " + "; ".join(parts))
    model.load_state_dict(converted, strict=True)
    return model.eval()


def unwrap_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The weights inside a training checkpoint's wrapper dicts (``'state_dict_ema'``, ``'model_ema'``,
    ``'state_dict'``, ``'model'``, in that order of preference, up to three levels deep)."""
    for _ in range(3):
        inner = next((state_dict[k] for k in WRAPPERS if isinstance(state_dict.get(k), dict)), None)
        if inner is None:
            break
        state_dict = inner
    return state_dict
