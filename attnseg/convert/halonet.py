"""HaloNet: timm checkpoints and timm ``ByoModelCfg`` records -> attnseg.

HaloNet has no official code or weights; timm's (v1.0.31) are the reference. attnseg keeps timm's parameter
names, so timm checkpoints (HF hub ``model.safetensors`` / ``pytorch_model.bin`` or the legacy ``.pth``) load
unchanged through :func:`attnseg.load_pretrained`. This module checks the keys, and turns a timm configuration
record (``dataclasses.asdict(ByoModelCfg)``, as the parity fixture stores it, or a timm model name) into a
:class:`~attnseg.backbones.halonet.HaloNetCfg`. Only the halo subset of ByobNet is covered: bottleneck and
halo blocks, tiered/7x7/3x3 stems, SE/ECA, 1x1-conv or no shortcuts; other timm layouts are refused by name.
"""

from __future__ import annotations

import re
from typing import Any

from attnseg.backbones.halonet import MODEL_CFGS, HaloNet, HaloNetCfg, StageCfg
from attnseg.convert._strict import load_strict
from attnseg.errors import CheckpointError
from attnseg.registry import suggest

__all__ = ["convert_state_dict", "from_official", "is_official", "cfg_from_timm"]

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_CNA = rf"(conv\.weight|bn\.{_BN})"
_KEYS = [
    rf"stem\.conv\d\.{_CNA}", rf"stem\.{_CNA}",
    rf"stages\.\d+\.\d+\.(shortcut|conv1_1x1|conv2_kxk|conv3_1x1)\.{_CNA}",
    r"stages\.\d+\.\d+\.attn\.(fc[12]\.(weight|bias)|conv\.weight)",
    r"stages\.\d+\.\d+\.self_attn\.(q|kv)\.weight", r"stages\.\d+\.\d+\.self_attn\.pos_embed\.(height|width)_rel",
    rf"stages\.\d+\.\d+\.post_attn\.{_BN}", rf"final_conv\.{_CNA}", r"head\.fc\.(weight|bias)",
]


def is_official(state_dict: dict[str, Any]) -> bool:
    """Always False: timm's layout is attnseg's, nothing needs renaming."""
    return False


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Check that every key is a (timm) HaloNet key and return the state_dict unchanged."""
    unplaced = [k for k in state_dict if not any(re.fullmatch(p, k) for p in _KEYS)]
    if unplaced:
        shown = ", ".join(unplaced[:10]) + (f", ... ({len(unplaced) - 10} more)" if len(unplaced) > 10 else "")
        raise CheckpointError(f"{len(unplaced)} key(s) are not HaloNet keys (timm halo ByobNet layout): {shown}")
    return dict(state_dict)


def _unsupported(what: str, value: Any, allowed: Any) -> ValueError:
    return ValueError(f"timm cfg {what}={value!r} is outside the HaloNet subset attnseg implements (allowed: {allowed})")


def cfg_from_timm(cfg: dict[str, Any]) -> HaloNetCfg:
    """A timm ``ByoModelCfg`` as a dict (blocks as dicts; a list entry is one interleaved stage) -> HaloNetCfg."""
    checks = {"norm_layer": ("batchnorm",), "aa_layer": ("",), "head_type": ("classifier",), "width_factor": (1.0,),
              "head_hidden_size": (None,), "self_attn_layer": ("halo", None), "downsample": ("conv1x1", "")}
    for key, allowed in checks.items():
        if cfg.get(key, allowed[0]) not in allowed:
            raise _unsupported(key, cfg[key], allowed)
    block_kwargs = cfg.get("block_kwargs") or {}
    if set(block_kwargs) - {"bottle_in", "linear_out"}:
        raise _unsupported("block_kwargs", block_kwargs, "bottle_in, linear_out")
    stages = []
    for entry in cfg["blocks"]:
        blocks = entry if isinstance(entry, list) else [entry]
        types: list[str] = []
        for block in blocks:
            if block["type"] not in ("bottle", "self_attn"):
                raise _unsupported("block type", block["type"], "bottle, self_attn")
            for key in ("attn_layer", "attn_kwargs", "block_kwargs", "self_attn_layer"):
                if block.get(key) not in (None, cfg.get(key)):
                    raise _unsupported(f"per-block {key}", block[key], "the model-level value")
            types += [block["type"]] * block["d"]
        first = blocks[0]
        halo = next((b["self_attn_kwargs"] for b in blocks if b.get("self_attn_kwargs") is not None), None)
        stages.append(StageCfg(tuple(types), first["c"], first["s"], first.get("gs") or None, first["br"], halo))
    stem_type = cfg.get("stem_type", "3x3") or "3x3"
    if stem_type not in ("tiered", "7x7", "3x3"):
        raise _unsupported("stem_type", stem_type, "tiered, 7x7, 3x3")
    return HaloNetCfg(
        stages=tuple(stages), stem_type=stem_type, stem_pool=bool(cfg.get("stem_pool")), stem_chs=cfg["stem_chs"],
        act=cfg.get("act_layer", "relu"), attn=cfg.get("attn_layer"), attn_kwargs=dict(cfg.get("attn_kwargs") or {}),
        halo=dict(cfg.get("self_attn_kwargs") or {}), bottle_in=bool(block_kwargs.get("bottle_in")),
        linear_out=bool(block_kwargs.get("linear_out")), downsample=cfg.get("downsample", "conv1x1") == "conv1x1",
        num_features=cfg.get("num_features", 0))


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> HaloNet:
    """Build attnseg's HaloNet for a timm record and load ``state_dict`` strictly.

    Args:
        constructor: ``{"name": timm model name (e.g. "halonet26t") or anything naming ByobNet, "kwargs": {...}}``;
            with ByobNet, ``kwargs["cfg"]`` is the ``ByoModelCfg`` dict. ``num_classes``, ``in_chans``,
            ``drop_rate`` and ``drop_path_rate`` pass through; ``img_size`` and ``pretrained`` are ignored.
        state_dict: timm weights.

    Returns:
        The model in eval mode; ``forward`` returns timm's logits.
    """
    name = str(constructor.get("name", ""))
    kwargs = dict(constructor.get("kwargs") or {})
    for key in ("img_size", "pretrained", "features_only"):
        kwargs.pop(key, None)
    if "cfg" in kwargs:
        cfg: HaloNetCfg | str = cfg_from_timm(kwargs.pop("cfg"))
    else:
        arch = name.split(".")[0].split(":")[-1]
        if arch not in MODEL_CFGS:
            raise ValueError(f"unknown timm HaloNet '{arch}'{suggest(arch, MODEL_CFGS)} (known: {', '.join(MODEL_CFGS)})")
        cfg = arch
    unknown = sorted(set(kwargs) - {"num_classes", "in_chans", "drop_rate", "drop_path_rate"})
    if unknown:
        raise ValueError(f"timm HaloNet arguments {unknown} are not supported")
    model = HaloNet(cfg, **kwargs, out_indices=(0, 1, 2, 3, 4))
    return load_strict(model, convert_state_dict(state_dict), f"timm weights do not fit the HaloNet of {name}")
