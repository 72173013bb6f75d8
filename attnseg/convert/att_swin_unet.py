"""Att-SwinU-Net: official checkpoints and Swin-T ImageNet weights -> attnseg (:mod:`attnseg.models.att_swin_unet`).

Layouts recognised by :func:`convert_state_dict`; the model is an :class:`~attnseg.models.att_swin_unet.AttSwinUNet`
Segmentor (``backbone.*`` = :class:`~attnseg.models.att_swin_unet.SwinUnetEncoder`, ``head.*`` =
:class:`~attnseg.heads.att_swin_unet.AttSwinUNetHead`), ``n`` = number of stages (4):

**Official** ``SwinAttentionUnet.state_dict()`` (NITR098/AttSwinUNet @ 4b14f37; saved by its trainer as
``{'model_weights': state_dict, 'test_F1_score': ...}``, which :func:`attnseg.load_pretrained` unwraps):

===============================================================  ==========================================
official                                                         attnseg
===============================================================  ==========================================
``encoder.patch_embed.*``, ``encoder.layers.{s}.*``,             ``backbone.`` + the same name
``encoder.norm.*``
``decoder.layers_up.0.{expand,norm}.*``                          ``head.expand.*``
``decoder.layers_up.{k}.blocks.*`` / ``.upsample.*`` (k >= 1)    ``head.levels.{n-1-k}.blocks.*`` / ``.upsample.*``
``decoder.concat_back_dim.{k}.*``                                ``head.levels.{n-1-k}.fuse.*``
``decoder.Crossvit_layer.{i}.layers.{d}.{a}.fn.norm.*``          ``head.levels.{i}.cca.layers.{d}.{a}.norm.*``
``decoder.Crossvit_layer.{i}.layers.{d}.{a}.fn.fn.to_q/to_kv.*`` ``head.levels.{i}.cca.layers.{d}.{a}.to_q/to_kv.*``
``decoder.Crossvit_layer.{i}.layers.{d}.{a}.fn.fn.to_out.0.*``   ``head.levels.{i}.cca.layers.{d}.{a}.to_out.*``
``decoder.norm_up.*``, ``decoder.up.*``, ``decoder.output.*``    ``head.norm.*``, ``head.final_expand.*``, ``head.output.*``
===============================================================  ==========================================

Dropped, by name: the top-level ``patch_embed.*`` (a second patch embedding with ``in_chans = patch_size``, never
used in forward), ``decoder.norm.*`` (built, never used), and every ``relative_position_index`` (attnseg computes it;
each one is checked equal to the index attnseg uses). The ``attn_mask`` buffers of shifted blocks are kept: the
model built with ``img_size`` (224) stores them and uses them at that size, so a checkpoint's masks are what runs.
:func:`from_official` also drops the CCA modules of the levels ``skip_num`` leaves out (the official code builds
all three and uses some).

**Swin-T ImageNet** (Microsoft's ``swin_tiny_patch4_window7_224.pth``, ``{'model': ...}``; detected by its
``layers.*.relative_position_index`` buffers), Swin-Unet's initialisation (``load_from`` in HuCaoFighting/Swin-Unet,
which the Att-SwinU-Net repo meant to call): ``patch_embed.*``, ``layers.{s}.*``, ``norm.*`` -> ``backbone.*``, and
every ``layers.{s}.blocks.*`` with ``s < n - 1`` also -> ``head.levels.{s}.blocks.*`` (Swin-Unet's ``layers.k`` ->
``layers_up.(3-k)``; its stage-4 copy had no place there either). The classifier ``head.*`` and the indices are
dropped. Load it with ``attnseg.load_pretrained(model, path, strict=False)``: the report lists the blocks the lite
model does not have (Swin-T's stage 3 has 6 blocks, the lite model 2) as unexpected, and the decoder parts Swin-T
has no weights for (expansions, fusions, CCA, output) as missing.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from attnseg.convert._strict import load_strict
from attnseg.errors import CheckpointError
from attnseg.layers.swin import relative_position_index
from attnseg.models.att_swin_unet import AttSwinUNet, att_swin_unet_tiny

__all__ = ["convert_state_dict", "convert_cross_transformer", "from_official", "is_official", "DROPPED_KEYS"]

# Official keys dropped on purpose (see the module docstring), as patterns.
DROPPED_KEYS = (r"patch_embed\.(proj|norm)\.(weight|bias)", r"decoder\.norm\.(weight|bias)",
                r".*\.relative_position_index")

_OFFICIAL = re.compile(r"^(encoder|decoder)\.")
_MICROSOFT = re.compile(r"^layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$")
_BLOCK = r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|blocks\.\d+\.attn_mask" \
         r"|blocks\.\d+\.attn\.relative_position_bias_table"
_P = r"(weight|bias)"
_TAIL = {"norm_up": "norm", "up": "final_expand", "output": "output"}


def is_official(state_dict: dict[str, Any]) -> bool:
    """Whether the keys are the official Att-SwinU-Net layout or a Microsoft Swin checkpoint (attnseg's own have
    ``backbone.``/``head.`` prefixes, or the encoder's names without index buffers)."""
    return any(_OFFICIAL.match(k) or _MICROSOFT.match(k) for k in state_dict)


def _check_index(key: str, value: torch.Tensor) -> None:
    w = round(value.shape[0] ** 0.5) if value.ndim == 2 else 0
    if value.ndim != 2 or w * w != value.shape[0] or not torch.equal(value.long(), relative_position_index((w, w))):
        raise CheckpointError(f"{key} is not the Swin relative position index of a square window (shape "
                              f"{list(value.shape)}); attnseg computes query minus key, row-major, as Swin does")


def _num_stages(keys: list[str], pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    if not found:
        raise CheckpointError(f"cannot tell the number of stages: no key matches {pattern}")
    return max(found) + 1


def _cross_transformer_key(key: str) -> str | None:
    """:class:`~attnseg.heads.att_swin_unet.CrossContextAttention` name of an official ``CrossTransformer`` key."""
    m = re.fullmatch(rf"layers\.(\d+)\.([01])\.fn\.(norm\.{_P}|fn\.to_q\.weight|fn\.to_kv\.weight|fn\.to_out\.0\.{_P})",
                     key)
    if m is None:
        return None
    return f"layers.{m.group(1)}.{m.group(2)}.{m.group(3).removeprefix('fn.').replace('to_out.0.', 'to_out.')}"


def convert_cross_transformer(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rename a bare official ``CrossTransformer`` state_dict (``model/skipconnection/crossvit.py``, one CCA module:
    ``layers.{d}.{a}.fn.norm.*``, ``.fn.fn.to_q/to_kv.weight``, ``.fn.fn.to_out.0.*``) to
    :class:`~attnseg.heads.att_swin_unet.CrossContextAttention` keys (``layers.{d}.{a}.norm/to_q/to_kv/to_out``).

    Raises:
        CheckpointError: listing the keys that are not CrossTransformer keys (``ProjectInOut`` projections of
            streams of different widths included: the official model never builds them).
    """
    out = {name: v for k, v in state_dict.items() if (name := _cross_transformer_key(k)) is not None}
    unplaced = [k for k in state_dict if _cross_transformer_key(k) is None]
    if unplaced:
        raise CheckpointError(f"{len(unplaced)} key(s) are not CrossTransformer keys: {', '.join(unplaced[:10])}")
    return out


def _official_key(key: str, n: int) -> str | None:
    """attnseg name of an official key that is kept, or None when the key has no place."""
    if re.fullmatch(rf"encoder\.(patch_embed\.(proj|norm)\.{_P}|norm\.{_P}|layers\.\d+\.({_BLOCK}"
                    rf"|downsample\.(norm|reduction)\.{_P}))", key):
        return "backbone." + key[len("encoder."):]
    m = re.fullmatch(rf"decoder\.layers_up\.0\.(expand\.weight|norm\.{_P})", key)
    if m:
        return f"head.expand.{m.group(1)}"
    m = re.fullmatch(rf"decoder\.layers_up\.(\d+)\.({_BLOCK}|upsample\.(expand\.weight|norm\.{_P}))", key)
    if m and 1 <= int(m.group(1)) < n:
        return f"head.levels.{n - 1 - int(m.group(1))}.{m.group(2)}"
    m = re.fullmatch(rf"decoder\.concat_back_dim\.(\d+)\.{_P}", key)
    if m and 1 <= int(m.group(1)) < n:
        return f"head.levels.{n - 1 - int(m.group(1))}.fuse.{m.group(2)}"
    m = re.fullmatch(r"decoder\.Crossvit_layer\.(\d+)\.(.+)", key)
    if m and (part := _cross_transformer_key(m.group(2))) is not None:
        return f"head.levels.{m.group(1)}.cca.{part}"
    m = re.fullmatch(rf"decoder\.(norm_up|up|output)\.(weight|bias|expand\.weight|norm\.{_P})", key)
    if m:
        return f"head.{_TAIL[m.group(1)]}.{m.group(2)}"
    return None


def _microsoft_keys(key: str, n: int) -> list[str] | None:
    """attnseg names of a Microsoft Swin key (Swin-Unet's initialisation), [] when dropped, None when unplaced."""
    if re.fullmatch(rf"head\.{_P}", key):
        return []  # the ImageNet classifier
    if re.fullmatch(rf"(patch_embed\.(proj|norm)\.{_P}|norm\.{_P}|layers\.\d+\.downsample\.(norm|reduction)\.{_P})",
                    key):
        return ["backbone." + key]
    m = re.fullmatch(rf"layers\.(\d+)\.({_BLOCK})", key)
    if m:
        s = int(m.group(1))
        return ["backbone." + key] + ([f"head.levels.{s}.{m.group(2)}"] if s < n - 1 else [])
    return None


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rename an official Att-SwinU-Net or a Microsoft Swin state_dict to attnseg's keys (module docstring).

    Raises:
        CheckpointError: listing the keys that have no place, or an index buffer that is not Swin's.
    """
    keys = list(state_dict)
    official = any(_OFFICIAL.match(k) for k in keys)
    n = _num_stages(keys, r"^encoder\.layers\.(\d+)\." if official else r"^layers\.(\d+)\.")
    out: dict[str, Any] = {}
    unplaced: list[str] = []
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            _check_index(key, value)
            continue
        if official:
            if any(re.fullmatch(p, key) for p in DROPPED_KEYS):
                continue
            name = _official_key(key, n)
            names = None if name is None else [name]
        else:
            names = _microsoft_keys(key, n)
        if names is None:
            unplaced.append(key)
            continue
        for name in names:
            out[name] = value
    if unplaced:
        shown = ", ".join(unplaced[:10]) + (f", ... ({len(unplaced) - 10} more)" if len(unplaced) > 10 else "")
        layout = "official Att-SwinU-Net" if official else "Microsoft Swin"
        raise CheckpointError(f"{len(unplaced)} key(s) have no place in attnseg's Att-SwinU-Net ({layout} layout): "
                              f"{shown}")
    return out


def _skip_levels(config: dict[str, Any]) -> int:
    """CCA levels the official decoder uses. ``skip_num`` is compared with the strings '1', '2', '3'; any other
    value (e.g. the int 3 of the ml_collections default) matches no branch and every level gets the plain skip."""
    mode = config.get("mode", "cross_contextual_attention")
    if mode == "cross_contextual_attention":
        skip_num = config.get("skip_num", "3")
        return int(skip_num) if skip_num in ("1", "2", "3") else 0
    if mode == "swin":
        if str(config.get("spatial_attention", "1")) == "1":
            raise ValueError("official mode 'swin' with spatial_attention='1' concatenates each skip twice (two "
                             "passes through concat_back_dim); attnseg implements mode 'cross_contextual_attention' "
                             "(any skip_num) and mode 'swin' with spatial_attention='0' (plain Swin-Unet skips)")
        return 0
    raise ValueError(f"official mode {mode!r} is not implemented (choose 'cross_contextual_attention' or 'swin')")


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> AttSwinUNet:
    """Build attnseg's Att-SwinU-Net for an official ``SwinAttentionUnet`` record and load ``state_dict`` strictly.

    Args:
        constructor: ``{"name": "SwinAttentionUnet", "config": {...}}`` (the ``config`` namespace as plain data, as
            the parity fixtures record it; ``kwargs`` is read when there is no ``config``). Read: ``embed_dim``,
            ``depths``, ``num_heads``, ``window_size``, ``mlp_ratio``, ``qkv_bias``, ``qk_scale``, ``drop_rate``,
            ``image_size`` (must be 224: the decoder hard-codes it), ``patch_size`` (must be 4), ``mode`` and
            ``skip_num`` (see :func:`_skip_levels`). Ignored as the official code ignores them: ``num_classes``
            (always 9 outputs), ``in_chans`` (always 3), ``attn_drop_rate`` (0), ``drop_path_rate`` (0.1),
            ``ape`` (False), ``patch_norm`` (True), and the no-op ``spatial_attention``/``operationaddatten``.
        state_dict: the official weights (keys as in :func:`convert_state_dict`).

    Returns:
        The model in eval mode with 9 output channels and ``cca_mode="faithful"``; ``forward`` gives the official
        logits (1-channel inputs repeated to 3, as the official forward does).
    """
    config = dict(constructor.get("config") or constructor.get("kwargs") or {})
    if config.get("image_size", 224) != 224:
        raise ValueError(f"the official model runs at image_size 224 only (its decoder hard-codes 224), got "
                         f"{config['image_size']}")
    if config.get("patch_size", 4) != 4:
        raise ValueError(f"the official decoder needs patch_size 4, got {config['patch_size']}")
    if config.get("final_upsample", "expand_first") != "expand_first":
        raise ValueError(f"only final_upsample='expand_first' builds an output layer, got {config['final_upsample']!r}")
    skip_levels = _skip_levels(config)
    args = {k: config[k] for k in ("embed_dim", "window_size", "mlp_ratio", "qkv_bias", "qk_scale", "drop_rate")
            if k in config}
    for k in ("depths", "num_heads"):
        if k in config:
            args[k] = tuple(config[k])
    model = att_swin_unet_tiny(in_chans=3, num_classes=9, img_size=224, drop_path_rate=0.1, attn_drop_rate=0.0,
                               skip_levels=skip_levels, cca_mode="faithful", **args)
    converted = convert_state_dict(state_dict)
    if not any(k.startswith("head.") for k in converted):
        raise CheckpointError("from_official needs a whole SwinAttentionUnet state_dict")
    unused = {f"head.levels.{i}.cca." for i, level in enumerate(model.head.levels) if level.cca is None}
    converted = {k: v for k, v in converted.items() if not k.startswith(tuple(unused))}
    return load_strict(model, converted, f"SwinAttentionUnet(config={config})")
