"""NAT / DiNAT / DiNAT_s and the isotropic models: official checkpoints -> attnseg (SHI-Labs/Neighborhood-Attention-Transformer @ d334f5b).

attnseg keeps the official key names, so classification checkpoints load unchanged and mm-style dense
checkpoints (``backbone.*`` with ``backbone.norm{i}``, plus the decode/neck heads) load once
:func:`attnseg.load_pretrained` has taken the ``backbone.`` part. HF ``transformers`` checkpoints
(``shi-labs/nat-*``/``dinat-*``: separate query/key/value, ``layer_scale_parameters [2, C]``) are renamed to
it. The isotropic ViT-RPB checkpoints carry ``layers.{i}.attn.relative_position_index`` buffers, which are
dropped after checking that they are the index attnseg computes. This module checks that every key belongs to
the layout, builds models from official constructor records, and resizes relative position biases when a
checkpoint's kernel differs from the model's (the official 11x11 checkpoints were made that way: bicubic
interpolation of the ``[heads, 2k-1, 2k-1]`` tables, as Swin does for window sizes).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from attnseg.backbones.nat import NAT, DiNATs, NATIsotropic
from attnseg.convert._strict import load_strict
from attnseg.errors import CheckpointError
from attnseg.layers import resize_rel_pos_table
from attnseg.registry import BACKBONES, suggest

__all__ = ["convert_state_dict", "from_official", "is_official", "resize_rpb"]

_P = r"(weight|bias)"
_BLOCK = rf"(attn\.rpb|attn\.(qkv|proj)\.{_P}|norm[12]\.{_P}|mlp\.fc[12]\.{_P}|gamma[12])"
_KEYS = [
    rf"patch_embed\.proj\.[01]\.{_P}", rf"patch_embed\.proj\.{_P}", rf"patch_embed\.norm\.{_P}",
    rf"(levels|layers)\.\d+\.blocks\.\d+\.{_BLOCK}", rf"layers\.\d+\.{_BLOCK}",
    rf"(levels|layers)\.\d+\.downsample\.(reduction|norm)\.{_P}",
    rf"norm\d?\.{_P}", rf"head\.{_P}",
]


_HF = re.compile(r"^(nat|dinat)\.(embeddings|encoder|layernorm)\.")
# HF transformers NatForImageClassification / DinatForImageClassification -> official, per block part
_HF_BLOCK = {"layernorm_before": "norm1", "attention.self.rpb": "attn.rpb", "attention.output.dense": "attn.proj",
             "layernorm_after": "norm2", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}


_INDEX = re.compile(r"^layers\.\d+\.attn\.relative_position_index$")


def is_official(state_dict: dict[str, Any]) -> bool:
    """True for the layouts that need converting: HF ``transformers`` checkpoints (``nat.*``/``dinat.*``) and
    ViT-RPB checkpoints with their index buffers."""
    return any(_HF.match(k) or _INDEX.match(k) for k in state_dict)


def _official_vitrpb_index(size: int) -> torch.Tensor:
    """The official ViT-RPB ``relative_position_index`` for a ``size x size`` map, derived from attnseg's rule
    (bias of query ``q``, key ``k`` at table entry ``(k_y - q_y + size - 1, k_x - q_x + size - 1)``), flattened
    row-major over the ``[2 size - 1, 2 size - 1]`` table."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    y, x = y.flatten(), x.flatten()
    return (y[None, :] - y[:, None] + size - 1) * (2 * size - 1) + (x[None, :] - x[:, None] + size - 1)


def _drop_vitrpb_index(state_dict: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        if not _INDEX.match(key):
            out[key] = value
            continue
        size = int(round(value.shape[0] ** 0.5))
        if value.ndim != 2 or size * size != value.shape[0] or not torch.equal(value.long(),
                                                                                _official_vitrpb_index(size)):
            raise CheckpointError(f"{key} is not the ViT-RPB index of a square map (shape {list(value.shape)}); "
                                  "attnseg computes the bias key minus query, as the official index does")
    return out


def _from_hf(state_dict: dict[str, Any]) -> dict[str, Any]:
    """HF ``transformers`` NAT/DiNAT keys -> official keys (q/k/v concatenated into qkv, layer scales split)."""
    out: dict[str, Any] = {}
    qkv: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        k = re.sub(r"^(nat|dinat)\.", "", key)
        k = k.replace("embeddings.patch_embeddings.projection.", "patch_embed.proj.").replace("embeddings.norm.",
                                                                                             "patch_embed.norm.")
        k = re.sub(r"^layernorm\.", "norm.", k)
        k = re.sub(r"^classifier\.", "head.", k)
        m = re.fullmatch(r"encoder\.levels\.(\d+)\.(layers\.(\d+)\.(.+)|downsample\.(.+))", k)
        if m and m.group(5) is not None:
            k = f"levels.{m.group(1)}.downsample.{m.group(5)}"
        elif m:
            block, part = f"levels.{m.group(1)}.blocks.{m.group(3)}", m.group(4)
            qkv_part = re.fullmatch(r"attention\.self\.(query|key|value)\.(weight|bias)", part)
            if qkv_part:
                qkv.setdefault(f"{block}.attn.qkv.{qkv_part.group(2)}", {})[qkv_part.group(1)] = value
                continue
            if part == "layer_scale_parameters":
                out[f"{block}.gamma1"], out[f"{block}.gamma2"] = value[0].clone(), value[1].clone()
                continue
            for hf, ours in _HF_BLOCK.items():
                if part.startswith(hf + "."):
                    part = ours + part[len(hf):]
                    break
                if part == hf:
                    part = ours
                    break
            k = f"{block}.{part}"
        out[k] = value
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"HF checkpoint lacks {sorted({'query', 'key', 'value'} - set(parts))} for {key}")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Official keys are checked and returned unchanged; HF ``transformers`` checkpoints are renamed first.

    Raises:
        CheckpointError: listing the keys with no place in the NAT/DiNAT/DiNAT_s layout.
    """
    if any(_HF.match(k) for k in state_dict):
        state_dict = _from_hf(state_dict)
    state_dict = _drop_vitrpb_index(state_dict)
    unplaced = [k for k in state_dict if not any(re.fullmatch(p, k) for p in _KEYS)]
    if unplaced:
        shown = ", ".join(unplaced[:10]) + (f", ... ({len(unplaced) - 10} more)" if len(unplaced) > 10 else "")
        raise CheckpointError(f"{len(unplaced)} key(s) are not NAT/DiNAT keys: {shown}")
    return dict(state_dict)


def resize_rpb(rpb: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Bicubically resize a ``[heads, 2k-1, 2k-1]`` relative position bias to another kernel size.

    Example::

        >>> resize_rpb(torch.zeros(2, 13, 13), 11).shape
        torch.Size([2, 21, 21])
    """
    return resize_rel_pos_table(rpb, (2 * kernel_size - 1,) * 2)


# Official constructor arguments that map one-to-one onto attnseg's; norm_layer is an object the record cannot hold.
_KWARGS = ("embed_dim", "mlp_ratio", "depths", "num_heads", "drop_path_rate", "in_chans", "kernel_size",
           "num_classes", "qkv_bias", "qk_scale", "drop_rate", "attn_drop_rate", "layer_scale", "dilations")
_ISO_KWARGS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
               "qkv_bias", "qk_scale", "kernel_size", "dilation", "drop_rate", "attn_drop_rate", "drop_path_rate")
_CLASSES = {"NAT": NAT, "DiNAT": NAT, "DiNAT_s": DiNATs, "NATIsotropic": NATIsotropic}
# The official isotropic model takes its block class as ``layer``; a record names it.
_ISO_LAYERS = ("NATransformerLayer", "VisionTransformerLayer")


def _model_kwargs(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Official constructor arguments -> attnseg's for ``cls``, refusing what attnseg does not build."""
    if kwargs.pop("patch_norm", True) is not True:
        raise ValueError("only patch_norm=True (every published model) is supported")
    if cls is NATIsotropic:
        layer = re.split(r"[.:]", str(kwargs.pop("layer", "NATransformerLayer")))[-1]
        if layer not in _ISO_LAYERS:
            raise ValueError(f"NATIsotropic layer must be one of {_ISO_LAYERS}, got {layer!r}")
        if layer == "VisionTransformerLayer":
            kwargs["kernel_size"], kwargs["dilation"] = None, None
        supported, extra = _ISO_KWARGS, {"pyramid": False}
    else:
        if kwargs.pop("patch_size", 4) != 4:
            raise ValueError("only DiNAT_s with patch_size=4 (the published layout) is supported")
        supported, extra = _KWARGS, {"pyramid_norm": False}
        if "depths" in kwargs:
            extra["out_indices"] = tuple(range(len(kwargs["depths"])))
    unknown = sorted(set(kwargs) - set(supported))
    if unknown:
        raise ValueError(f"official {cls.__name__} arguments {unknown} are not supported "
                         f"(supported: {', '.join(supported)})")
    if kwargs.get("num_classes", 1000) == 0:
        raise ValueError("an official NAT model with num_classes=0 keeps its final norm; build the attnseg model "
                         "with num_classes=0 and load with attnseg.load_pretrained instead")
    return {**kwargs, **extra}


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> NAT | DiNATs | NATIsotropic:
    """Build attnseg's model for an official constructor record and load ``state_dict`` strictly.

    Args:
        constructor: ``{"name": "NAT" | "DiNAT" | "DiNAT_s" | "NATIsotropic" | a factory such as "dinat_tiny"
            or "vitrpb_small", "kwargs": {...}}``; the name may carry a path (``"classification/nat.py:NAT"``).
            ``pretrained`` is ignored; DiNAT_s takes only ``patch_size=4``; every model only ``patch_norm=True``;
            NATIsotropic's ``layer`` is named (``"NATransformerLayer"`` or ``"VisionTransformerLayer"``).
        state_dict: official weights.

    Returns:
        The model in eval mode without pyramid norms or feature pyramid; ``forward`` returns the official logits.
    """
    name = re.split(r"[:/]", str(constructor.get("name", "NAT")))[-1].removesuffix(".py")
    kwargs = dict(constructor.get("kwargs") or {})
    kwargs.pop("pretrained", None)
    ours = (NAT, DiNATs, NATIsotropic)
    if name in _CLASSES:
        cls = _CLASSES[name]
        model = cls(**_model_kwargs(cls, kwargs))
    elif name in BACKBONES and BACKBONES.owner_class(name) in ours:
        model = BACKBONES.get(name)(**_model_kwargs(BACKBONES.owner_class(name), kwargs))
    else:
        choices = [*_CLASSES, *(n for n in BACKBONES if BACKBONES.owner_class(n) in ours)]
        raise ValueError(f"unknown official NAT constructor '{name}'{suggest(name, choices)} (known: {', '.join(choices)})")
    converted = convert_state_dict(state_dict)
    return load_strict(model, converted, f"official weights do not fit {name}({kwargs})")
