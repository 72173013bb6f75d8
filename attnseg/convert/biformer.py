"""BiFormer: official checkpoints -> attnseg (rayleizhu/BiFormer @ 1697bbb).

attnseg keeps the official key names: released classification files (``{'model': state_dict}``) and mm-style
dense files (``state_dict`` with ``backbone.*`` keys and ``backbone.extra_norms.*``) load unchanged through
:func:`attnseg.load_pretrained`, which unwraps and strips the prefix. This module checks that keys belong to
the layout and builds models from official constructor records; the routing ablation modes of the official
class, which no released checkpoint uses, are refused with the reason.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from attnseg.backbones.biformer import BiFormer
from attnseg.convert._strict import load_strict
from attnseg.errors import CheckpointError
from attnseg.models.pyramid import FeaturePyramid
from attnseg.registry import BACKBONES, suggest

__all__ = ["convert_state_dict", "from_official", "is_official"]

_P = r"(weight|bias)"
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_KEYS = [
    rf"downsample_layers\.0\.[03]\.{_P}", rf"downsample_layers\.0\.[14]\.{_BN}",
    rf"downsample_layers\.[123]\.0\.{_P}", rf"downsample_layers\.[123]\.1\.{_BN}",
    rf"stages\.\d\.\d+\.(pos_embed|norm1|norm2|mlp\.0|mlp\.3)\.{_P}", r"stages\.\d\.\d+\.gamma[12]",
    rf"stages\.\d\.\d+\.attn\.(qkv\.qkv|wo|lepe|qkv|proj)\.{_P}",
    rf"norm\.{_BN}", rf"head\.{_P}", rf"extra_norms\.\d\.{_P}",
]


def is_official(state_dict: dict[str, Any]) -> bool:
    """Always False: the official layout is attnseg's, nothing needs renaming."""
    return False


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Check that every key is a BiFormer key and return the state_dict unchanged.

    Raises:
        CheckpointError: listing keys with no place (e.g. the refactored ``biformer_stl_nchw`` layout,
            ``qkv_linear``/``output_linear``, whose operator differs and is not implemented).
    """
    unplaced = [k for k in state_dict if not any(re.fullmatch(p, k) for p in _KEYS)]
    if unplaced:
        hint = " (the biformer_stl_nchw ablation layout)" if any("qkv_linear" in k for k in unplaced) else ""
        shown = ", ".join(unplaced[:10]) + (f", ... ({len(unplaced) - 10} more)" if len(unplaced) > 10 else "")
        raise CheckpointError(f"{len(unplaced)} key(s) are not BiFormer keys{hint}: {shown}")
    return dict(state_dict)


# official argument -> the only value attnseg implements (every released model uses it)
_FIXED = {"kv_downsample_mode": "identity", "param_routing": False, "diff_routing": False, "soft_routing": False,
          "pre_norm": True, "pe": None, "param_attention": "qkvo", "mlp_dwconv": False, "representation_size": None}
_IGNORED = ("kv_per_wins", "kv_downsample_kernels", "kv_downsample_ratios", "auto_pad", "use_checkpoint_stages",
            "drop_rate", "pe_stages", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay")
_KWARGS = ("depth", "in_chans", "num_classes", "embed_dim", "head_dim", "qk_dims", "qk_scale", "drop_path_rate",
           "n_win", "topks", "side_dwconv", "layer_scale_init_value", "mlp_ratios", "before_attn_dwconv")


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> nn.Module:
    """Build attnseg's BiFormer for an official constructor record and load ``state_dict`` strictly.

    Args:
        constructor: ``{"name": "BiFormer" | "BiFormer_mm" | "biformer_tiny" | ..., "kwargs": {...}}``; the name may
            carry a path. Ignored arguments: the kv downsampling sizes (unused in ``identity`` mode), ``auto_pad``
            (attnseg always pads, identical for divisible inputs), checkpointing and the pretrained flags.
        state_dict: official weights.

    Returns:
        In eval mode: for ``BiFormer`` (and factories) the classifier, whose ``forward`` gives the official logits;
        for ``BiFormer_mm`` a :class:`~attnseg.models.pyramid.FeaturePyramid` whose ``forward`` gives the four
        normed maps the official dense backbone returns.
    """
    name = re.split(r"[:/]", str(constructor.get("name", "BiFormer")))[-1]
    kwargs = dict(constructor.get("kwargs") or {})
    for key, value in _FIXED.items():
        if key in kwargs and kwargs.pop(key) != value:
            raise ValueError(f"official BiFormer with {key}={constructor['kwargs'][key]!r} is an ablation that attnseg "
                             f"does not implement (released models use {value!r})")
    for key in _IGNORED:
        kwargs.pop(key, None)
    unknown = sorted(set(kwargs) - set(_KWARGS))
    if unknown:
        raise ValueError(f"official BiFormer arguments {unknown} are not supported (supported: {', '.join(_KWARGS)})")
    dense = name == "BiFormer_mm"
    kwargs["pyramid_norm"] = dense
    if dense:
        kwargs["num_classes"] = 0
    if name in ("BiFormer", "BiFormer_mm"):
        model: nn.Module = BiFormer(**kwargs)
    elif name in BACKBONES and BACKBONES.owner_class(name) is BiFormer:
        model = BACKBONES.get(name)(**kwargs)
    else:
        choices = ["BiFormer", "BiFormer_mm", *(n for n in BACKBONES if BACKBONES.owner_class(n) is BiFormer)]
        raise ValueError(f"unknown official BiFormer constructor '{name}'{suggest(name, choices)} "
                         f"(known: {', '.join(choices)})")
    model = load_strict(model, convert_state_dict(state_dict), f"official weights do not fit {name}({kwargs})")
    return FeaturePyramid(model).eval() if dense else model
