"""TransNeXt: official classification and mm-style dense state_dicts -> attnseg's layout.

attnseg's :class:`~attnseg.backbones.transnext.TransNeXt` keeps the official key names (``patch_embed{i}.*``,
``block{i}.{j}.{norm1,attn,norm2,mlp}.*``, ``norm{i}.*``, ``head.*``), so the conversion is a check that every key
belongs to that layout, plus what the published files wrap around it:

- a wrapper dict (``'model'``, ``'state_dict'``, ``'state_dict_ema'``, ``'model_ema'``) is unwrapped;
- mm-style dense checkpoints (mmseg/mmdet) carry the backbone under ``backbone.``: those keys are kept without the
  prefix and the decoder's (``decode_head.*``, ``auxiliary_head.*``, ``neck.*``, ...) are left out;
- the official non-persistent buffers (``relative_pos_index{i}``, ``relative_coords_table{i}``, ``seq_length_scale``,
  ``padding_mask``), should a file hold them, are dropped: attnseg derives them from the map size per forward.

:func:`attnseg.load_pretrained` does the unwrapping and prefix stripping itself; :func:`convert_state_dict` accepts
them too so that :func:`from_official` takes a checkpoint as read from disk.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from attnseg.backbones.transnext import TransNeXt
from attnseg.convert._strict import load_strict, unwrap_state_dict
from attnseg.errors import CheckpointError
from attnseg.registry import BACKBONES, suggest

__all__ = ["convert_state_dict", "from_official", "is_official"]

_P = r"(weight|bias)"
_KEYS = [
    rf"patch_embed\d+\.(proj|norm)\.{_P}",
    rf"block\d+\.\d+\.(norm1|norm2)\.{_P}",
    r"block\d+\.\d+\.attn\.(temperature|query_embedding|relative_pos_bias_local|learnable_tokens|learnable_bias)",
    rf"block\d+\.\d+\.attn\.(q|kv|qkv|proj|sr|norm|cpb_fc1|cpb_fc2)\.{_P}",
    rf"block\d+\.\d+\.mlp\.(fc1|fc2|dwconv\.dwconv)\.{_P}",
    rf"norm\d+\.{_P}",
    rf"head\.{_P}",
]
_BUFFERS = [r"relative_pos_index\d+", r"relative_coords_table\d+",
            r"block\d+\.\d+\.attn\.(seq_length_scale|padding_mask|relative_pos_index|relative_coords_table)"]


def _unwrap(state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    return state_dict


def is_official(state_dict: dict[str, Any]) -> bool:
    """Whether the keys need :func:`convert_state_dict` (stale buffers to drop); the names are attnseg's already."""
    return any(re.fullmatch(p, k) for k in state_dict for p in _BUFFERS)


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Official TransNeXt keys (bare, wrapped or ``backbone.``-prefixed) -> attnseg keys; every key must be placed.

    Raises:
        CheckpointError: keys that belong to no TransNeXt module (listed), or no TransNeXt key at all.
    """
    state_dict = _unwrap(state_dict)
    out: dict[str, Any] = {}
    unplaced: list[str] = []
    for key, value in state_dict.items():
        if any(re.fullmatch(p, key) for p in _KEYS):
            out[key] = value
        elif not any(re.fullmatch(p, key) for p in _BUFFERS):
            unplaced.append(key)
    if not out:
        raise CheckpointError(f"not a TransNeXt state_dict (no patch_embed/block/norm key); first keys: "
                              f"{list(state_dict)[:5]}")
    if unplaced:
        shown = ", ".join(unplaced[:10]) + (f", ... ({len(unplaced) - 10} more)" if len(unplaced) > 10 else "")
        raise CheckpointError(f"{len(unplaced)} key(s) of a TransNeXt state_dict have no place in attnseg's layout: "
                              f"{shown}")
    return out


# Official constructor arguments that map one-to-one onto TransNeXt's.
_KWARGS = ("img_size", "pretrain_size", "window_size", "in_chans", "num_classes", "embed_dims", "num_heads",
           "mlp_ratios", "qkv_bias", "drop_rate", "attn_drop_rate", "drop_path_rate", "depths", "sr_ratios",
           "fixed_pool_size")
_FACTORIES = {"transnext_micro": "transnext_micro", "transnext_tiny": "transnext_tiny",
              "transnext_small": "transnext_small", "transnext_base": "transnext_base",
              "transnext_micro_AAAA": "transnext_micro_aaaa"}


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> nn.Module:
    """Build attnseg's TransNeXt for an official constructor record and load ``state_dict`` strictly.

    Args:
        constructor: ``{"name": "TransNeXt" | "transnext_tiny" | ..., "module": ..., "kwargs": {...}}``. The dense
            backbones (``module`` under ``segmentation/`` or ``detection/``, or an ``is_extrapolation`` argument)
            give a :class:`~attnseg.models.pyramid.FeaturePyramid` whose ``forward`` returns the four NCHW maps;
            ``is_extrapolation`` selects ``bias_mode``. ``norm_layer`` must be LayerNorm with eps 1e-6 (every
            release), ``patch_size`` 4 and ``num_stages`` the number of depths; ``pretrained`` is ignored.
        state_dict: official weights (bare, wrapped, or an mm-style checkpoint with ``backbone.`` keys).

    Returns:
        The model in eval mode; its ``forward`` returns what the official module's returns.

    Raises:
        ValueError: an unknown constructor name or an argument attnseg does not implement.
        CheckpointError: weights that do not fit.
    """
    name = re.split(r"[:./]", str(constructor.get("name", "TransNeXt")))[-1]
    module = str(constructor.get("module", ""))
    kwargs = dict(constructor.get("kwargs") or {})
    dense = "is_extrapolation" in kwargs or module.startswith(("segmentation", "detection"))
    kwargs.pop("pretrained", None)
    extrapolate = bool(kwargs.pop("is_extrapolation", False))
    norm = kwargs.pop("norm_layer", None)
    if norm is not None and not (isinstance(norm, dict) and norm.get("type") == "LayerNorm"
                                 and float(norm.get("eps", 1e-5)) == 1e-6):
        raise ValueError(f"official TransNeXt norm_layer {norm!r} is not supported (released models use LayerNorm "
                         "with eps 1e-6)")
    if kwargs.pop("patch_size", 4) != 4:
        raise ValueError("official TransNeXt patch_size other than 4 is not supported (every release uses 4)")
    num_stages = kwargs.pop("num_stages", None)
    if num_stages is not None and "depths" in kwargs and num_stages != len(kwargs["depths"]):
        raise ValueError(f"num_stages={num_stages} with {len(kwargs['depths'])} depths is not supported")
    unknown = sorted(set(kwargs) - set(_KWARGS))
    if unknown:
        raise ValueError(f"official TransNeXt arguments {unknown} are not supported (supported: {', '.join(_KWARGS)})")
    kwargs["bias_mode"] = "extrapolate" if extrapolate else "interpolate"
    if dense:
        kwargs["num_classes"] = 0
    if "depths" in kwargs:
        kwargs["out_indices"] = tuple(range(len(kwargs["depths"])))
    if name == "TransNeXt":
        model: nn.Module = TransNeXt(**kwargs)
    elif name in _FACTORIES:
        model = BACKBONES.get(_FACTORIES[name])(**kwargs)
    else:
        choices = ("TransNeXt", *_FACTORIES)
        raise ValueError(f"unknown official TransNeXt constructor '{name}'{suggest(name, choices)} "
                         f"(known: {', '.join(choices)})")
    converted = convert_state_dict(state_dict)
    if dense:  # the official dense backbones have no classifier
        converted = {k: v for k, v in converted.items() if not k.startswith("head.")}
    model = load_strict(model, converted, f"official TransNeXt weights do not fit {name}({kwargs})")
    if dense:
        from attnseg.models.pyramid import FeaturePyramid

        return FeaturePyramid(model).eval()
    return model
