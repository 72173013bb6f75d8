"""Sparsifiner: official state_dicts and DeiT / timm ViT weights -> attnseg's layout.

attnseg's :class:`~attnseg.backbones.sparsifiner.Sparsifiner` keeps the official key names, which are timm's DeiT
names plus ``blocks.{i}.attn.mask_predictor.{proj_n, proj_back_n, proj_c_q.*, proj_c_k.*}``. So the conversion
checks that every key belongs to that layout and handles what the published files wrap around it:

- a wrapper dict (``'model'`` as in the DeiT release, ``'state_dict'``, ``'state_dict_ema'``, ``'model_ema'``) is
  unwrapped;
- an old-style 2-D ``patch_embed.proj.weight`` (manual patchify + linear, the official ``checkpoint_filter_fn``) is
  reshaped to the convolution (3 input channels, square patches);
- timm ViT extras that are no-ops for DeiT (``fc_norm`` absent) are refused rather than dropped silently; DeiT
  distilled checkpoints (``dist_token``, ``head_dist``) are refused with a message (the distillation token is not
  part of Sparsifiner).

DeiT / timm ViT weights have no predictor: :func:`attnseg.load_pretrained` loads them into a Sparsifiner and reports
the ``mask_predictor`` (and pyramid) keys as initialized, which the official training does too (predictor trained
first, against the dense teacher's attention).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from attnseg.backbones.sparsifiner import Sparsifiner
from attnseg.convert._strict import load_strict, unwrap_state_dict
from attnseg.errors import CheckpointError
from attnseg.registry import BACKBONES, suggest

__all__ = ["convert_state_dict", "from_official", "is_official", "OfficialSparsifiner"]

_P = r"(weight|bias)"
_KEYS = [
    r"cls_token", r"pos_embed", rf"patch_embed\.proj\.{_P}",
    rf"blocks\.\d+\.(norm1|norm2)\.{_P}",
    rf"blocks\.\d+\.attn\.(qkv|proj)\.{_P}",
    r"blocks\.\d+\.attn\.mask_predictor\.(proj_n|proj_back_n)",
    rf"blocks\.\d+\.attn\.mask_predictor\.(proj_c_q|proj_c_k)\.{_P}",
    rf"blocks\.\d+\.mlp\.(fc1|fc2)\.{_P}",
    rf"norm\.{_P}", rf"head\.{_P}",
]


def is_official(state_dict: dict[str, Any]) -> bool:
    """Whether the keys need :func:`convert_state_dict`: only an old-style 2-D patch embedding does (the names are
    attnseg's already)."""
    w = state_dict.get("patch_embed.proj.weight")
    return isinstance(w, torch.Tensor) and w.ndim == 2


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Official Sparsifiner or DeiT / timm ViT keys (bare or wrapped) -> attnseg keys; every key must be placed.

    Raises:
        CheckpointError: keys that belong to no Sparsifiner module (listed; distilled DeiT named), or no key at all.
    """
    state_dict = unwrap_state_dict(state_dict)
    out: dict[str, Any] = {}
    unplaced: list[str] = []
    for key, value in state_dict.items():
        if not any(re.fullmatch(p, key) for p in _KEYS):
            unplaced.append(key)
        elif key == "patch_embed.proj.weight" and value.ndim == 2:  # [C, 3*p*p] -> [C, 3, p, p]
            p = math.isqrt(value.shape[1] // 3)
            if 3 * p * p != value.shape[1]:
                raise CheckpointError(f"2-D patch_embed.proj.weight {list(value.shape)} is not 3 channels x square "
                                      "patches")
            out[key] = value.reshape(value.shape[0], 3, p, p)
        else:
            out[key] = value
    if not any(k.startswith("blocks.") for k in out):
        raise CheckpointError(f"not a Sparsifiner / DeiT state_dict (no blocks.* key); first keys: "
                              f"{list(state_dict)[:5]}")
    if unplaced:
        hint = (" (a distilled DeiT: its distillation token and head have no place in Sparsifiner; use the plain "
                "deit_*_patch16_224 weights)" if {"dist_token", "head_dist.weight"} & set(unplaced) else "")
        shown = ", ".join(unplaced[:10]) + (f", ... ({len(unplaced) - 10} more)" if len(unplaced) > 10 else "")
        raise CheckpointError(f"{len(unplaced)} key(s) of a Sparsifiner state_dict have no place in attnseg's "
                              f"layout{hint}: {shown}")
    return out


class OfficialSparsifiner(nn.Module):
    """A :class:`Sparsifiner` whose ``forward`` returns the official dict (:meth:`Sparsifiner.forward_official`).

    Parameters live under ``backbone.``; ``backbone`` is the plain model (``forward`` -> logits).
    """

    def __init__(self, backbone: Sparsifiner) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return self.backbone.forward_official(x)


# Official constructor arguments that map one-to-one onto Sparsifiner's.
_KWARGS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
           "qkv_bias", "qk_scale", "drop_rate", "attn_drop_rate", "drop_path_rate", "reduce_n_factor",
           "reduce_c_factor", "share_inout_proj")
_FACTORIES = {"sparsifiner_deit_tiny": "sparsifiner_deit_tiny", "sparsifiner_deit_small": "sparsifiner_deit_small",
              "sparsifiner_deit_base": "sparsifiner_deit_base"}


def _cfg_kwargs(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The official yacs ``cfg`` (as a nested dict) -> predictor arguments; absent keys keep the released defaults."""
    if not cfg:
        return {}
    spar, loss = cfg.get("SPAR", {}), cfg.get("LOSS", {})
    out: dict[str, Any] = {}
    if "BASIS_THRESHOLD" in spar:
        out["basis_threshold"] = float(spar["BASIS_THRESHOLD"])
    coef = spar.get("BASIS_COEF", {})
    if "THRESHOLD" in coef:
        out["coef_threshold"] = float(coef["THRESHOLD"])
    if coef.get("USE_TOPK", True):
        if "TOPK" in coef:
            out["coef_topk"] = int(coef["TOPK"])
    else:
        out["coef_topk"] = None
    score = spar.get("ATTN_SCORE", {})
    if "USE_TOPK" in score:
        out["score_topk"] = bool(score["USE_TOPK"])
        if not score["USE_TOPK"] and float(score.get("THRESHOLD", 1e-4)) <= 0:
            raise ValueError("official cfg with ATTN_SCORE.USE_TOPK False and THRESHOLD <= 0 has no mask rule "
                             "(the official code raises NotImplementedError)")
    if "THRESHOLD" in score:
        out["score_threshold"] = float(score["THRESHOLD"])
    if "USE_ATTN_RECON" in loss:
        out["attn_recon"] = bool(loss["USE_ATTN_RECON"])
    return out


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> nn.Module:
    """Build attnseg's Sparsifiner for an official constructor record and load ``state_dict`` strictly.

    Args:
        constructor: ``{"name": "Sparsifiner" | "sparsifiner_deit_*", "kwargs": {...}, "cfg": {...}}`` (``cfg``
            may also sit in ``kwargs``): the official keyword arguments and the yacs config as nested dicts.
            ``attn_keep_rate_list`` becomes ``keep_rate``; token pruning (any ``token_pruning_loc_indicator``),
            ``representation_size``, ``hybrid_backbone`` and a norm other than LayerNorm(eps 1e-6) are refused.
        state_dict: official weights (bare or wrapped).

    Returns:
        :class:`OfficialSparsifiner` in eval mode: its ``forward`` returns the official dict (``'x'`` = logits).

    Raises:
        ValueError: an unknown constructor name or an argument attnseg does not implement.
        CheckpointError: weights that do not fit.
    """
    name = re.split(r"[:./]", str(constructor.get("name", "Sparsifiner")))[-1]
    kwargs = dict(constructor.get("kwargs") or {})
    cfg = kwargs.pop("cfg", None) or constructor.get("cfg")
    keep = kwargs.pop("attn_keep_rate_list", None)
    if keep is not None:
        kwargs["keep_rate"] = list(keep)
    pruning = kwargs.pop("token_pruning_loc_indicator", None) or []
    if any(pruning):
        raise ValueError("official Sparsifiner token pruning (token_pruning_loc_indicator) is not implemented "
                         "(off in every released config)")
    kwargs.pop("token_keep_rate_list", None)  # only read by token pruning
    kwargs.pop("distill", None)  # stored, never used by the official model
    for unsupported in ("representation_size", "hybrid_backbone"):
        if kwargs.pop(unsupported, None) is not None:
            raise ValueError(f"official Sparsifiner argument {unsupported} is not supported (unused in releases)")
    norm = kwargs.pop("norm_layer", None)
    if norm is not None and not (isinstance(norm, dict) and norm.get("type") == "LayerNorm"
                                 and float(norm.get("eps", 1e-5)) == 1e-6):
        raise ValueError(f"official Sparsifiner norm_layer {norm!r} is not supported (the default is LayerNorm with "
                         "eps 1e-6)")
    unknown = sorted(set(kwargs) - set(_KWARGS) - {"keep_rate"})
    if unknown:
        raise ValueError(f"official Sparsifiner arguments {unknown} are not supported (supported: "
                         f"{', '.join(_KWARGS)}, attn_keep_rate_list)")
    kwargs.update(_cfg_kwargs(cfg))
    kwargs["pyramid"] = False  # the official model has no dense version
    if name == "Sparsifiner":
        # the official class defaults differ from the DeiT-S factory's: ViT-B width, 12 heads, reduce_n_factor 8
        model = Sparsifiner(**{"embed_dim": 768, "num_heads": 12, "reduce_n_factor": 8, **kwargs})
    elif name in _FACTORIES:
        model = BACKBONES.get(_FACTORIES[name])(**kwargs)
    else:
        choices = ("Sparsifiner", *_FACTORIES)
        raise ValueError(f"unknown official Sparsifiner constructor '{name}'{suggest(name, choices)} "
                         f"(known: {', '.join(choices)})")
    if model.norm is None:  # official num_classes=0: no head, but the final norm stays (its 'x' is the normed cls)
        model.norm = nn.LayerNorm(model.embed_dim, eps=1e-6)
    converted = convert_state_dict(state_dict)
    model = load_strict(model, converted, f"official Sparsifiner weights do not fit {name}({kwargs})")
    return OfficialSparsifiner(model).eval()
