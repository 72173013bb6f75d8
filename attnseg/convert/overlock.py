"""OverLoCK: official checkpoints -> attnseg (LMMMEng/OverLoCK @ 2c8ab3b).

attnseg keeps the official key names, so every released file loads through :func:`attnseg.load_pretrained`, which
unwraps ``model`` / ``state_dict`` / ``state_dict_ema`` and strips the ``backbone.`` prefix of mm-style files:

- ``overlock_{xt,t,s,b}_in1k_224.pth`` into ``overlock_*`` (train form: ``lk_origin`` + ``origin_bn`` + the
  ``dil_conv_k*_*`` / ``dil_bn_k*_*`` branches of every DilatedReparamBlock);
- ``*_reparam.pth`` into ``overlock_*_reparam`` (deploy form: ``lk_origin.{weight,bias}`` only);
- ``upernet_overlock_*_ade20k.pth`` / ``maskrcnn*_overlock_*_coco.pth`` into a model with ``pyramid_norm="seg"``
  / ``"det"`` (``extra_norm.*``, plus ``h_proj.*`` for detection; ImageNet files lack these: they start fresh).

:func:`fuse_state_dict` turns a train-form state_dict into the deploy form (what the official ``reparam()`` does to
a model), so a deploy model also loads the original release files; :func:`convert_state_dict` applies it when asked.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from attnseg.backbones.overlock import _DILATED_BRANCHES, DilatedReparamBlock, OverLoCK, merge_dilated_reparam
from attnseg.convert._strict import load_strict
from attnseg.errors import CheckpointError
from attnseg.models.pyramid import FeaturePyramid
from attnseg.registry import BACKBONES, suggest

__all__ = ["convert_state_dict", "from_official", "is_official", "fuse_state_dict", "is_deploy_form"]

_P = r"(weight|bias)"
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_DRB = rf"(lk_origin\.{_P}|origin_bn\.{_BN}|dil_conv_k\d+_\d+\.weight|dil_bn_k\d+_\d+\.{_BN})"
_KEYS = [
    rf"patch_embed[1-4]\.\d+\.{_BN}", rf"patch_embedx\.[xh]_proj\.[01]\.{_BN}", rf"high_level_proj\.{_P}",
    # RepConvBlock
    rf"blocks[1-4]\.\d+\.(dwconv|ls)\.{_P}", rf"blocks[1-4]\.\d+\.proj\.[02468]\.{_BN}",
    rf"blocks[1-4]\.\d+\.proj\.1\.{_DRB}", rf"blocks[1-4]\.\d+\.proj\.3\.proj\.[13]\.{_P}",
    r"blocks[1-4]\.\d+\.proj\.7\.(gamma|beta)",
    # DynamicConvBlock (ContMix)
    r"sub_blocks[34]\.\d+\.rpb[12]",
    rf"sub_blocks[34]\.\d+\.(x_scale|h_scale|dwconv1|dwconv2|norm1|norm2|ls1|ls2|weight_proj)\.{_P}",
    rf"sub_blocks[34]\.\d+\.(fusion|weight_query|weight_key|dyconv_proj|gate|proj|mlp)\.\d\.{_BN}",
    r"sub_blocks[34]\.\d+\.(fusion|mlp)\.\d\.(gamma|beta)", rf"sub_blocks[34]\.\d+\.lepe\.1\.{_BN}",
    rf"sub_blocks[34]\.\d+\.lepe\.0\.{_DRB}", rf"sub_blocks[34]\.\d+\.se_layer\.proj\.[13]\.{_P}",
    # heads and the dense additions
    rf"(head|aux_head)\.\d\.{_BN}", rf"extra_norm\.[0-4]\.{_P}", rf"h_proj\.0\.{_P}", rf"h_proj\.1\.{_P}",
]
_DRB_PREFIX = re.compile(r"^(.*\.(?:proj\.1|lepe\.0))\.(?:lk_origin|origin_bn|dil_conv_k|dil_bn_k)")


def is_official(state_dict: dict[str, Any]) -> bool:
    """Always False: the official layout is attnseg's, nothing needs renaming."""
    return False


def is_deploy_form(state_dict: dict[str, Any]) -> bool:
    """Whether the DilatedReparamBlocks are merged (``*_reparam`` files): no ``origin_bn``/``dil_*`` keys."""
    return not any(".origin_bn." in k or ".dil_conv_k" in k for k in state_dict)


def _check_keys(state_dict: dict[str, Any]) -> None:
    unplaced = [k for k in state_dict if not any(re.fullmatch(p, k) for p in _KEYS)]
    if unplaced:
        hint = ""
        if any(k.startswith(("backbone.", "module.", "model.")) for k in unplaced):
            hint = " (strip the wrapper prefix first, or load with attnseg.load_pretrained, which does)"
        elif any("weight_value" in k or "fusion_proj" in k for k in unplaced):
            hint = " (the plug-and-play models/contmix.py ContMixBlock, a different layout)"
        shown = ", ".join(unplaced[:10]) + (f", ... ({len(unplaced) - 10} more)" if len(unplaced) > 10 else "")
        raise CheckpointError(f"{len(unplaced)} key(s) are not OverLoCK keys{hint}: {shown}")


def fuse_state_dict(state_dict: dict[str, Any], bn_eps: float = 1e-5) -> dict[str, Any]:
    """Train-form OverLoCK keys -> deploy form: each DilatedReparamBlock's conv, BN and dilated branches become
    one depthwise KxK ``lk_origin.{weight,bias}`` (eval-mode outputs equal); other keys pass through.

    The kernel size of each block is read from its ``lk_origin.weight``. Already merged blocks are kept.
    """
    blocks: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        m = _DRB_PREFIX.match(key)
        if m:
            blocks.setdefault(m.group(1), {})[key[len(m.group(1)) + 1:]] = value
        else:
            out[key] = value
    for prefix, tensors in blocks.items():
        if "origin_bn.weight" not in tensors:  # already merged
            out.update({f"{prefix}.{k}": v for k, v in tensors.items()})
            continue
        kernel = tensors["lk_origin.weight"].shape[-1]
        if kernel not in _DILATED_BRANCHES:
            raise CheckpointError(f"{prefix}: DilatedReparamBlock kernel {kernel} is not one of {sorted(_DILATED_BRANCHES)}")
        with torch.no_grad():
            merged = merge_dilated_reparam({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()},
                                           kernel, eps=bn_eps)
        dtype = tensors["lk_origin.weight"].dtype
        out.update({f"{prefix}.{k}": v.to(dtype) for k, v in merged.items()})
    return out


def convert_state_dict(state_dict: dict[str, Any], deploy: bool | None = None) -> dict[str, Any]:
    """Check that every key is an OverLoCK key; return the state_dict (merged into deploy form if ``deploy``).

    Raises:
        CheckpointError: listing keys with no place; or ``deploy=False`` asked of merged weights (a merged
            conv cannot be split back into its branches).
    """
    _check_keys(state_dict)
    if deploy and not is_deploy_form(state_dict):
        return fuse_state_dict(state_dict)
    if deploy is False and is_deploy_form(state_dict) and any(".lk_origin." in k for k in state_dict):
        raise CheckpointError("these OverLoCK weights are in the merged (deploy / *_reparam) form; build the model "
                              "with deploy=True (e.g. overlock_t_reparam): merged convs cannot be split back")
    return dict(state_dict)


_IGNORED = ("use_gemm", "drop_rate", "use_checkpoint", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
            "norm_layer")
_KWARGS = ("depth", "sub_depth", "in_chans", "embed_dim", "kernel_size", "mlp_ratio", "sub_mlp_ratio", "sub_num_heads",
           "ls_init_value", "res_scale", "smk_size", "deploy", "use_ds", "drop_path_rate", "projection", "num_classes")
_FACTORIES = ("overlock_xt", "overlock_t", "overlock_s", "overlock_b", "overlock_xt_reparam", "overlock_t_reparam",
              "overlock_s_reparam", "overlock_b_reparam")


def _dense_kind(constructor: dict[str, Any]) -> str | None:
    where = f"{constructor.get('module', '')}:{constructor.get('name', '')}"
    if "segmentation" in where:
        return "seg"
    if "detection" in where:
        return "det"
    return None


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> nn.Module:
    """Build attnseg's OverLoCK for an official constructor record and load ``state_dict`` strictly.

    Args:
        constructor: ``{"name": "OverLoCK" | "overlock_t" | "overlock_t_reparam" | ..., "module": path, "kwargs":
            {...}}``. A module (or name) path containing ``segmentation`` / ``detection`` selects the mm dense
            backbone. Ignored: ``use_gemm`` (same numerics), ``drop_rate`` (unused), ``use_checkpoint``,
            the pretrained flags and ``norm_layer`` (always the official LayerNorm2d).
        state_dict: official weights. With ``deploy=True`` train-form weights are merged first (:func:`fuse_state_dict`).

    Returns:
        In eval mode: the classifier (``forward`` gives the official eval logits), or for the dense backbones a
        :class:`~attnseg.models.pyramid.FeaturePyramid` whose ``forward`` gives the official list of 4 maps.
    """
    name = re.split(r"[:/]", str(constructor.get("name", "OverLoCK")))[-1]
    kwargs = dict(constructor.get("kwargs") or {})
    for key in _IGNORED:
        kwargs.pop(key, None)
    unknown = sorted(set(kwargs) - set(_KWARGS))
    if unknown:
        raise ValueError(f"official OverLoCK arguments {unknown} are not supported (supported: {', '.join(_KWARGS)})")
    dense = _dense_kind(constructor)
    if dense is not None:
        kwargs["num_classes"] = 0  # the mm backbones delete head and aux_head
    elif kwargs.get("num_classes", 1000) == 0:
        raise ValueError("official OverLoCK with num_classes=0 keeps its head up to the projection; attnseg drops the "
                         "heads instead: build OverLoCK(num_classes=0) and load with attnseg.load_pretrained")
    kwargs["pyramid_norm"] = dense
    if name == "OverLoCK":
        model: OverLoCK = OverLoCK(**kwargs)
    elif name in _FACTORIES:
        model = BACKBONES.get(name)(**kwargs)
    else:
        choices = ("OverLoCK", *_FACTORIES)
        raise ValueError(f"unknown official OverLoCK constructor '{name}'{suggest(name, choices)} "
                         f"(known: {', '.join(choices)})")
    deploy = any(m.deploy for m in model.modules() if isinstance(m, DilatedReparamBlock))
    converted = convert_state_dict(state_dict, deploy=deploy)
    model = load_strict(model, converted, f"official weights do not fit {name}({kwargs})")
    return FeaturePyramid(model).eval() if dense is not None else model
