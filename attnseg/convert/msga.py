"""Multi-scale self-guided attention: official ``DAF_stack`` state_dicts -> attnseg (:mod:`attnseg.models.msga`).

Official code: sinAshish/Multi-Scale-Attention @ 96d76f2 (``src/models/my_stacked_danet.py``; checkpoints saved as a
bare state_dict). The model is an :class:`~attnseg.models.msga.MSGA` Segmentor: ``backbone.*`` =
:class:`~attnseg.backbones.resnet.ResNet` (torchvision layout), ``head.*`` = :class:`~attnseg.heads.msga.MSGAHead`.
``k`` is the official scale index 1-4 (``down1`` = stride 4 ... ``down4`` = stride 32); attnseg indexes levels by
``k - 1``; ``l`` is the guidance level 1 or 2.

=====================================================  ==========================================================
official                                               attnseg
=====================================================  ==========================================================
``resnext.layer0.0.*``, ``resnext.layer0.1.*``          ``backbone.conv1.*``, ``backbone.bn1.*``
``resnext.layer1.1.*`` (``layer1.0`` is the max-pool)   ``backbone.layer1.*``
``resnext.layer{2,3,4}.*``                              ``backbone.layer{2,3,4}.*``
``down{k}.{0,1,2}.*``                                   ``head.down.{k-1}.{conv,bn,act}.*``
``predict{k}.*`` / ``predict{k}_2.*``                   ``head.side_predict.{k-1}.*`` / ``head.predict.{k-1}.*``
``fuse1.fuse_attn.{0..8}.*``                            ``head.fuse.{block1.conv,block1.bn,block1.act,block2.conv,
                                                        block2.bn,block2.act,conv3,bn3,act3}.*``
``pam_attention_{l}_{k}.attn.{0..6}.*``                 ``head.guide{l}.pam.{k-1}.{proj.conv,proj.bn,proj.act,
                                                        attention,refine.conv,refine.bn,refine.act}.*``
``cam_attention_{l}_{k}.attn.{0..6}.*``                 ``head.guide{l}.cam.{k-1}.`` the same
``semanticModule_{l}_1.{enc1,enc2}.encode.{i}.*``       ``head.guide{l}.semantic.{enc1,enc2}.{i}.*``
``semanticModule_{l}_1.{dec1,dec2}.decode.{i}.*``       ``head.guide{l}.semantic.{dec1,dec2}.{i}.*``
``conv_sem_{l}_{j}.*`` (**reversed**: j=1 is down4)     ``head.guide{l}.conv_sem.{4-j}.*``
``conv8_{j}.*`` / ``conv8_1{j}.*`` (**reversed**)       ``head.guide1.out.{4-j}.*`` / ``head.guide2.out.{4-j}.*``
=====================================================  ==========================================================

The semantic modules are shared across scales (one per level, ``semanticModule_{l}_1``); PAM/CAM branches follow the
scale index; ``conv_sem_*`` and ``conv8_*`` use the reversed index (reference/heads.md §3.3).

Dropped, by name (:data:`DROPPED_KEYS`): ``attention{1-4}.*`` and ``refine{1-4}.*`` (``MultiConv`` modules built but
never called in ``forward``), ``conv6_{1-4}.*`` and ``conv7_{1-4}.*`` (dropout + 1x1 conv, never called): 0.96 M
parameters that change nothing. Every other key must be placed, or :func:`convert_state_dict` raises
:class:`~attnseg.errors.CheckpointError` listing the keys it cannot place.
"""

from __future__ import annotations

import re
from typing import Any

from attnseg.convert._strict import load_strict
from attnseg.errors import CheckpointError
from attnseg.models.msga import MSGA, msga_resnext101

__all__ = ["convert_state_dict", "convert_block", "from_official", "is_official", "DROPPED_KEYS", "head_key"]

# Official modules built but never used in forward (see the module docstring), as patterns.
DROPPED_KEYS = (r"attention[1-4]\..+", r"refine[1-4]\..+", r"conv6_[1-4]\..+", r"conv7_[1-4]\..+")

_NUM_SCALES = 4
_BRANCH = {"0": "proj.conv", "1": "proj.bn", "2": "proj.act", "3": "attention", "4": "refine.conv",
           "5": "refine.bn", "6": "refine.act"}
_MULTICONV = {"0": "block1.conv", "1": "block1.bn", "2": "block1.act", "3": "block2.conv", "4": "block2.bn",
              "5": "block2.act", "6": "conv3", "7": "bn3", "8": "act3"}
_DOWN = {"0": "conv", "1": "bn", "2": "act"}


def is_official(state_dict: dict[str, Any]) -> bool:
    """Whether the keys are the official ``DAF_stack`` layout (``resnext.layer0.*``, ``fuse1.*`` ...)."""
    return any(k.startswith(("resnext.", "fuse1.", "semanticModule_")) for k in state_dict)


def _backbone_key(key: str) -> str | None:
    m = re.fullmatch(r"resnext\.layer0\.([01])\.(.+)", key)
    if m:
        return f"backbone.{'conv1' if m.group(1) == '0' else 'bn1'}.{m.group(2)}"
    m = re.fullmatch(r"resnext\.layer1\.1\.(.+)", key)
    if m:
        return f"backbone.layer1.{m.group(1)}"
    m = re.fullmatch(r"resnext\.layer([234])\.(.+)", key)
    if m:
        return f"backbone.layer{m.group(1)}.{m.group(2)}"
    return None


def head_key(key: str) -> str | None:
    """attnseg :class:`~attnseg.heads.msga.MSGAHead` key (without ``head.``) of an official head key, or None when
    the key has no place (dropped keys included)."""
    n = _NUM_SCALES
    m = re.fullmatch(r"down([1-4])\.([012])\.(.+)", key)
    if m:
        return f"down.{int(m.group(1)) - 1}.{_DOWN[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"predict([1-4])(_2)?\.(weight|bias)", key)
    if m:
        return f"{'predict' if m.group(2) else 'side_predict'}.{int(m.group(1)) - 1}.{m.group(3)}"
    m = re.fullmatch(r"fuse1\.fuse_attn\.(\d)\.(.+)", key)
    if m and m.group(1) in _MULTICONV:
        return f"fuse.{_MULTICONV[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"(pam|cam)_attention_([12])_([1-4])\.attn\.(\d)\.(.+)", key)
    if m and m.group(4) in _BRANCH:
        return f"guide{m.group(2)}.{m.group(1)}.{int(m.group(3)) - 1}.{_BRANCH[m.group(4)]}.{m.group(5)}"
    m = re.fullmatch(r"semanticModule_([12])_1\.(enc1|enc2|dec1|dec2)\.(encode|decode)\.(\d+)\.(.+)", key)
    if m and (m.group(3) == "encode") == m.group(2).startswith("enc"):
        return f"guide{m.group(1)}.semantic.{m.group(2)}.{m.group(4)}.{m.group(5)}"
    m = re.fullmatch(r"conv_sem_([12])_([1-4])\.(weight|bias)", key)
    if m:
        return f"guide{m.group(1)}.conv_sem.{n - int(m.group(2))}.{m.group(3)}"
    m = re.fullmatch(r"conv8_(1?)([1-4])\.(weight|bias)", key)
    if m:
        return f"guide{2 if m.group(1) else 1}.out.{n - int(m.group(2))}.{m.group(3)}"
    return None


def convert_block(name: str, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rename the state_dict of one official building block to its attnseg counterpart's keys.

    ``name``: ``"PAM_Module"`` / ``"CAM_Module"`` (:mod:`attnseg.layers.danet`, same keys), ``"PAM_CAM_Layer"``
    (:class:`~attnseg.heads.msga.AttentionBranch`), ``"semanticModule"``
    (:class:`~attnseg.heads.msga.SemanticModule`) or ``"MultiConv"`` (:class:`~attnseg.heads.msga.MultiConv`).

    Raises:
        ValueError: an unknown block name. CheckpointError: keys that are not the block's.
    """
    rules = {
        "PAM_Module": lambda k: k if re.fullmatch(r"gamma|(query|key|value)_conv\.(weight|bias)", k) else None,
        "CAM_Module": lambda k: k if k == "gamma" else None,
        "PAM_CAM_Layer": lambda k: (f"{_BRANCH[m.group(1)]}.{m.group(2)}"
                                    if (m := re.fullmatch(r"attn\.(\d)\.(.+)", k)) and m.group(1) in _BRANCH else None),
        "semanticModule": lambda k: (f"{m.group(1)}.{m.group(3)}.{m.group(4)}"
                                     if (m := re.fullmatch(r"(enc[12]|dec[12])\.(encode|decode)\.(\d+)\.(.+)", k))
                                     and (m.group(2) == "encode") == m.group(1).startswith("enc") else None),
        "MultiConv": lambda k: (f"{_MULTICONV[m.group(1)]}.{m.group(2)}"
                                if (m := re.fullmatch(r"fuse_attn\.(\d)\.(.+)", k)) and m.group(1) in _MULTICONV
                                else None),
    }
    if name not in rules:
        raise ValueError(f"unknown official MSGA block {name!r} (known: {', '.join(rules)})")
    out = {new: v for k, v in state_dict.items() if (new := rules[name](k)) is not None}
    unplaced = [k for k in state_dict if rules[name](k) is None]
    if unplaced:
        raise CheckpointError(f"{len(unplaced)} key(s) are not {name} keys: {', '.join(unplaced[:10])}")
    return out


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rename an official ``DAF_stack`` state_dict (or a head-only part of one) to attnseg's keys (module docstring).

    Values are passed through as they are (views included; ``load_state_dict`` copies them).

    Raises:
        CheckpointError: listing the keys that have no place.
    """
    out: dict[str, Any] = {}
    unplaced: list[str] = []
    for key, value in state_dict.items():
        if any(re.fullmatch(p, key) for p in DROPPED_KEYS):
            continue
        name = _backbone_key(key) if key.startswith("resnext.") else head_key(key)
        if name is None:
            unplaced.append(key)
        elif key.startswith("resnext."):
            out[name] = value
        else:
            out[f"head.{name}"] = value
    if unplaced:
        shown = ", ".join(unplaced[:10]) + (f", ... ({len(unplaced) - 10} more)" if len(unplaced) > 10 else "")
        raise CheckpointError(f"{len(unplaced)} key(s) have no place in attnseg's MSGA (official DAF_stack layout): "
                              f"{shown}")
    return out


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> MSGA:
    """Build attnseg's MSGA for an official ``DAF_stack`` record and load ``state_dict`` strictly.

    Args:
        constructor: ``{"name": "DAF_stack", "kwargs": {}}`` (the official class takes no arguments: 1 input
            channel, 5 classes, ResNeXt-101 32x8d).
        state_dict: the official weights (keys as in :func:`convert_state_dict`).

    Returns:
        The model in eval mode; ``forward`` returns the official eval output (the mean of the four refined logits)
        in eval mode and, in training mode, a dict holding the official 32-tuple's tensors (see
        :mod:`attnseg.heads.msga`).
    """
    name = constructor.get("name", "DAF_stack")
    if name != "DAF_stack":
        raise ValueError(f"attnseg.convert.msga builds the official DAF_stack, got constructor name {name!r}")
    if constructor.get("kwargs"):
        raise ValueError(f"the official DAF_stack takes no arguments, got {constructor['kwargs']}")
    model = msga_resnext101(in_chans=1, num_classes=5)
    return load_strict(model, convert_state_dict(state_dict), "DAF_stack")
