"""Swin UNETR: MONAI state_dicts and the published checkpoints -> attnseg (:mod:`attnseg.models.swin_unetr`).

Layouts recognised by :func:`convert_state_dict` (the model is a Segmentor: ``backbone.*`` = the Swin encoder,
``head.*`` = the UNETR decoder, whose module names are MONAI's):

- **MONAI** ``SwinUNETR.state_dict()``, also inside the published BTCV (``swin_unetr.{base,small,tiny}_5000ep_*``)
  and BraTS (``fold{0..4}_f48_ep300_*/model.pt``) files (``{'epoch', 'best_acc', 'state_dict'}``): ``swinViT.X``
  -> ``backbone.X``, every other key -> ``head.X`` unchanged.
- **Self-supervised encoder** (Tang et al., CVPR 2022, ``model_swinvit.pt``: ``{'state_dict': {'module.…'}}``;
  :func:`attnseg.load_pretrained` strips ``module.``), and a bare ``swinViT`` state_dict: ``patch_embed.*``,
  ``layers{k}.*`` -> ``backbone.*``; the unused final ``norm.*`` is dropped (research-contributions#150). This
  is what MONAI's ``SwinUNETR.load_from`` copies; loading it through MONAI's ``load_state_dict(strict=False)`` path
  instead silently loads nothing (research-contributions#268, #346).
- **Disruptive autoencoder** weights (Valanarasu et al. 2023, ``ssl_pretrained_weights.pth``, ``{'model': ...}``):
  ``encoder.patch_embed.*`` and ``encoder.layers{k}.0.0.*`` (one extra level) -> ``backbone.*``; its CNN blocks
  already have MONAI's names -> ``head.*``; ``encoder.mask_token``, ``encoder.norm.*`` and the reconstruction
  output ``out.conv.conv.*`` are dropped (MONAI's ``filter_swinunetr``: 157 of 159 tensors load).

In every layout the Swin MLP keys ``mlp.linear1/2`` (MONAI) become ``mlp.fc1/2`` (the self-supervised file
already says ``fc``), and the ``relative_position_index`` buffers are dropped (attnseg rebuilds them from the
window size; a table of another window size fails the shape check instead).

Encoder-only files leave the decoder (DAE: the output layer) at its initialisation: load them with
``load_pretrained(model, path, strict=False)`` (the report lists what stayed) or into ``model.backbone``. The 3D
merge order is not in any checkpoint: the published 3D files need ``merge_order="legacy"`` (the default).
Self-supervised weights have one input channel; for other channel counts :func:`attnseg.load_pretrained` adapts
the patch-embedding weight (repeated over the channels and scaled, as timm does for first convs; reported).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from attnseg.convert._strict import load_strict
from attnseg.errors import CheckpointError
from attnseg.models.swin_unetr import swin_unetr

__all__ = ["convert_state_dict", "from_official", "is_official"]

_ENCODER = re.compile(r"(patch_embed\.(proj|norm)|layers[1-4]\.0\.(blocks\.\d+|downsample)|layers[1-4]c\.0\.layer)\.")
_HEAD = re.compile(r"(encoder(1|2|3|4|5|10)|decoder[1-5]|out)\.")
_DROPPED = re.compile(r"(.*\.relative_position_index|norm\.(weight|bias))")
_DAE_DROPPED = {"encoder.mask_token", "encoder.norm.weight", "encoder.norm.bias", "out.conv.conv.weight",
                "out.conv.conv.bias"}


def is_official(state_dict: dict[str, Any]) -> bool:
    """Whether ``state_dict`` is in one of the layouts above (attnseg's own never has these keys)."""
    return any(k.startswith(("swinViT.", "encoder.patch_embed.", "encoder.layers")) or k.endswith(
        "relative_position_index") or ".mlp.linear" in k for k in state_dict)


def _encoder_key(key: str) -> str:
    return "backbone." + key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rename a MONAI / published Swin UNETR state_dict to attnseg's Segmentor keys (module docstring).

    Raises:
        CheckpointError: listing the keys that belong to none of the layouts.
    """
    dae = any(k.startswith(("encoder.patch_embed.", "encoder.layers")) for k in state_dict)
    out: dict[str, Any] = {}
    unplaced: list[str] = []
    for key, value in state_dict.items():
        if dae and key in _DAE_DROPPED:
            continue
        name = key
        if name.startswith("swinViT."):
            name = name[len("swinViT."):]
        elif dae and name.startswith("encoder."):
            name = re.sub(r"^encoder\.(layers[1-4]\.0\.)0\.", r"\1", name)  # drop the DAE's extra level
            name = name[len("encoder."):] if name.startswith("encoder.") else name
        if _DROPPED.fullmatch(name):
            continue
        if _ENCODER.match(name):
            out[_encoder_key(name)] = value
        elif _HEAD.match(name) and name == key:
            out["head." + name] = value
        else:
            unplaced.append(key)
    if unplaced:
        shown = ", ".join(unplaced[:10]) + (f", ... ({len(unplaced) - 10} more)" if len(unplaced) > 10 else "")
        raise CheckpointError(f"{len(unplaced)} key(s) are not Swin UNETR keys (MONAI, self-supervised or DAE "
                              f"layout): {shown}")
    return out


# MONAI SwinUNETR argument -> attnseg (swin_unetr / SwinViT) argument
_RENAMED = {"in_channels": "in_chans", "out_channels": "num_classes", "dropout_path_rate": "drop_path_rate",
            "use_checkpoint": "grad_checkpointing"}
_KEPT = ("feature_size", "spatial_dims", "depths", "num_heads", "window_size", "patch_size", "qkv_bias", "mlp_ratio",
         "drop_rate", "attn_drop_rate", "normalize", "patch_norm", "use_v2", "downsample", "norm_name")
_IGNORED = ("img_size",)  # MONAI <= 1.4 only checked it


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> nn.Module:
    """Build attnseg's Swin UNETR for a MONAI ``SwinUNETR`` constructor record and load ``state_dict`` strictly.

    Args:
        constructor: ``{"name": "SwinUNETR", "kwargs": {MONAI >= 1.5 keyword arguments}, "merge_order_3d":
            "legacy" | "current"}`` as the parity fixtures record it (default merge order: ``"legacy"``).
        state_dict: MONAI (or published) weights, any layout of :func:`convert_state_dict`.

    Returns:
        The Segmentor in eval mode; ``forward`` gives MONAI's logits.

    Raises:
        ValueError: an argument attnseg does not implement (MONAI 1.6's Hyena stages, flash-attention switches,
            a ``downsample`` module class), named.
    """
    kwargs = dict(constructor.get("kwargs") or {})
    args: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in _RENAMED:
            args[_RENAMED[key]] = value
        elif key in _KEPT:
            args[key] = list(value) if isinstance(value, tuple) else value
        elif key == "norm_layer" and value in (None, "LayerNorm", {"type": "LayerNorm"}):
            continue
        elif key in ("use_flash_attention",) or key in _IGNORED:
            continue  # same outputs
        else:
            raise ValueError(f"SwinUNETR argument {key}={value!r} is not implemented by attnseg's Swin UNETR")
    if "downsample" in args and not isinstance(args["downsample"], str):
        raise ValueError(f"downsample must be 'merging' or 'mergingv2', got {args['downsample']!r}")
    args["merge_order"] = constructor.get("merge_order_3d", "legacy")
    model = swin_unetr(**args)
    converted = convert_state_dict(state_dict)
    if not any(k.startswith("head.") for k in converted):
        raise CheckpointError("from_official needs a whole SwinUNETR state_dict; this one holds the encoder only "
                              "(load it with attnseg.load_pretrained(model, path, strict=False))")
    return load_strict(model, converted, f"SwinUNETR({kwargs})")
